"""Speed race: seconds per GRPO training step, lightning-rlm vs TRL's GRPOTrainer, same everything.

Same tiny pretrained Llama (the cached base model folder), same TinyStories prompts and tokenizer, same
batch (2 prompts x 8 generations), max_completion_length, beta, learning rate, sampling settings
(temperature 1.0, repetition penalty 1.1, no top-p/top-k), loss type `grpo`, fp32 on the CPU, no gradient
checkpointing; TRL with `use_cpu=True` and no vLLM. The two run alternately (ours, TRL, ours, TRL, ...) so
drifting machine load hits both; per run we take the median step time after 2 warm-up steps, the reward trend
(mean reward of the first vs the last 10 steps) and the peak resident memory of the process during that run's
lifetime (each run is its own process, so the peak is that run's: loading, rollouts and updates). TRL is a
benchmark-only extra (`pip install -e ".[bench]"`).

`--model lrlm:smollm2-135m-instruct` races on the real chat model instead (prompts rendered through its chat
template as in `configs/grpo/smollm2_lora.yaml`, then given to both trainers as the same plain strings; both stop
at its end-of-turn token, `<|im_end|>`, which is also its `eos_token`); `--lora-rank 16` trains LoRA (alpha = 2 x
rank, every linear layer but the LM head) on both sides, each using the adapter-disabled policy as its reference.

    python benchmarks/grpo_vs_trl.py [--steps 50] [--repeats 2] [--model lrlm:smollm2-135m-instruct] [--lora-rank 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import lightning as L
import torch

from lightning_rlm.data import PromptDataModule, TextSource
from lightning_rlm.data.chat import ChatFormat
from lightning_rlm.methods import GRPO
from lightning_rlm.models.base_model import resolve_model_path
from lightning_rlm.rewards import SentenceLength

SETTINGS = dict(num_generations=8, max_completion_length=48, beta=0.02, lr=1e-4, temperature=1.0,
                repetition_penalty=1.1)
PROMPTS_PER_STEP = 2
CHAT = ChatFormat(user_template="Continue this story in a few short sentences.\n\n{text}")  # smollm2_lora.yaml


class Timer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.rewards: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t)
        total = outputs["rollout"].rewards["total"]
        self.rewards.append(sum(total) / len(total))


def datamodule(base: str, chat: bool, seed: int = 0) -> PromptDataModule:
    return PromptDataModule(TextSource(preset="tinystories"), tokenizer=base, prompt_tokens=8,
                            batch_size=PROMPTS_PER_STEP, seed=seed, chat=CHAT if chat else None)


def run_ours(base: str, steps: int, seed: int, chat: bool, lora_rank: int | None) -> tuple[list[float], list[float]]:
    L.seed_everything(seed)
    dm = datamodule(base, chat, seed)
    lora = dict(lora_rank=lora_rank, lora_alpha=2 * lora_rank) if lora_rank else {}
    model = GRPO(model_name_or_path=base, rewards=[SentenceLength(10, "smooth")], loss_type="grpo",
                 eval_prompt=None, **SETTINGS, **lora)
    timer = Timer()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    trainer.fit(model, datamodule=dm)
    return timer.times, timer.rewards


def run_trl(base: str, steps: int, seed: int, prompts: list[str],
            lora_rank: int | None) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    peft_config = None
    if lora_rank:
        from peft import LoraConfig
        peft_config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    reward = SentenceLength(10, "smooth")
    rewards: list[float] = []

    def sentence_length_10_smooth(prompts, completions, **kwargs):
        values = reward(prompts, completions, tokenizer=tok)
        rewards.append(sum(values) / len(values))
        return values

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, per_device_train_batch_size=PROMPTS_PER_STEP * SETTINGS["num_generations"],
            num_generations=SETTINGS["num_generations"], max_completion_length=SETTINGS["max_completion_length"],
            beta=SETTINGS["beta"], learning_rate=SETTINGS["lr"], temperature=SETTINGS["temperature"],
            repetition_penalty=SETTINGS["repetition_penalty"], top_p=1.0, loss_type="grpo", scale_rewards="group",
            use_cpu=True, bf16=False, fp16=False, max_steps=steps, logging_steps=1000, report_to="none",
            save_strategy="no", seed=seed, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            adam_beta2=0.99, max_grad_norm=1.0, disable_dropout=True, gradient_checkpointing=False,
        )
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(base), reward_funcs=sentence_length_10_smooth,
                              args=cfg, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                              callbacks=[timer], peft_config=peft_config)
        trainer.train()
    return timer.times, rewards


def summary(times: list[float], rewards: list[float], peak_gb: float) -> tuple[float, float, float, float]:
    k = min(10, len(rewards) // 2)
    return statistics.median(times[2:]), sum(rewards[:k]) / k, sum(rewards[-k:]) / k, peak_gb


def run_one(args: argparse.Namespace) -> None:
    """One side of one repeat, in this process: prints a JSON line (times, rewards, peak RSS in GB)."""
    base = resolve_model_path(args.model)
    from transformers import AutoTokenizer

    chat = AutoTokenizer.from_pretrained(base).chat_template is not None
    if args.only == "ours":
        times, rewards = run_ours(base, args.steps, args.seed, chat, args.lora_rank)
    else:
        dm = datamodule(base, chat)
        dm.setup("fit")
        times, rewards = run_trl(base, args.steps, args.seed, [ex["prompt"] for ex in dm.train_set], args.lora_rank)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux
    print("RESULT " + json.dumps({"times": times, "rewards": rewards, "peak_gb": peak}), flush=True)


def spawn(args: argparse.Namespace, side: str, seed: int) -> tuple[float, float, float, float]:
    cmd = [sys.executable, __file__, "--only", side, "--seed", str(seed), "--steps", str(args.steps), "--model",
           args.model] + (["--lora-rank", str(args.lora_rank)] if args.lora_rank else [])
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    return summary(result["times"], result["rewards"], result["peak_gb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="lrlm:tiny-llama-tinystories", help="an lrlm: name or an HF folder")
    ap.add_argument("--lora-rank", type=int, default=None, help="LoRA rank on both sides (default: full fine-tuning)")
    ap.add_argument("--only", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        return run_one(args)
    print(f"model {args.model}, {'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full fine-tuning'}, "
          f"{args.steps} steps x {args.repeats} repeats, each run in its own process", flush=True)
    rows = []
    for r in range(args.repeats):
        ours, trl = spawn(args, "ours", r), spawn(args, "trl", r)
        rows.append((r, ours, trl))
        print(f"repeat {r}: ours {ours[0]:.3f} s/step (reward {ours[1]:.3f} -> {ours[2]:.3f}, peak {ours[3]:.2f} GB); "
              f"TRL {trl[0]:.3f} s/step (reward {trl[1]:.3f} -> {trl[2]:.3f}, peak {trl[3]:.2f} GB)", flush=True)
    print("\n| repeat | lightning-rlm s/step | TRL s/step | speed-up | reward ours (first→last 10) | "
          "reward TRL (first→last 10) | peak RSS ours / TRL (GB) |\n|---|---|---|---|---|---|---|")
    for r, o, t in rows:
        print(f"| {r} | {o[0]:.3f} | {t[0]:.3f} | {t[0] / o[0]:.2f}x | {o[1]:.3f} → {o[2]:.3f} | {t[1]:.3f} → {t[2]:.3f} "
              f"| {o[3]:.2f} / {t[3]:.2f} |")
    ratio = statistics.median(t[0] / o[0] for _, o, t in rows)
    print(f"\nmedian speed-up (TRL s/step / ours): {ratio:.2f}x over {args.repeats} repeats of {args.steps} steps "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
