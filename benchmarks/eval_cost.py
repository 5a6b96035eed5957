"""What a downstream evaluation costs: examples per second for each task and scoring mode.

Runs `lightning_rlm.tasks.evaluate` on SmolLM2-135M-Instruct (`lrlm:smollm2-135m-instruct`, or `--model`)
for GSM8K (greedy generation, `--max-new-tokens` 128), CommonsenseQA by answer log-likelihood (one pass gives
both the sum and the per-token mean) and CommonsenseQA by generating the letter, on a seeded subset of
each, after one warm-up example per mode, timed `--repeats` times (the fastest is reported, as other
work on a shared machine only slows a run down), and prints a table (seconds, examples/s, accuracy, mean
prompt and generated tokens), so an evaluation callback's `limit` and frequency can be sized. The
accuracies of such small subsets are noisy; they are printed only to show the run is sane.

    python benchmarks/eval_cost.py --gsm8k-n 8 --csqa-n 32 [--plain] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_rlm.data.chat import ChatFormat
from lightning_rlm.models.base_model import resolve_model_path
from lightning_rlm.tasks import GSM8K, CommonsenseQA, Task, evaluate


def mean_prompt_tokens(task: Task, tok, indices: list[int], letter: bool = False) -> float:
    examples = [task.examples()[i] for i in indices]
    special = task.chat is None
    kw = {"letter": True} if letter else {}
    lengths = [len(tok.encode(task.prompt(ex, tok, **kw), add_special_tokens=special)) for ex in examples]
    return sum(lengths) / len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="lrlm:smollm2-135m-instruct")
    parser.add_argument("--gsm8k-n", type=int, default=8, help="GSM8K test problems")
    parser.add_argument("--csqa-n", type=int, default=32, help="CommonsenseQA dev questions")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="GSM8K generation budget")
    parser.add_argument("--plain", action="store_true", help="plain prompts instead of the chat template")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per mode; the fastest is reported")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = (
        AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    )
    chat = None if args.plain else ChatFormat()
    gsm8k, csqa = GSM8K(chat=chat), CommonsenseQA(chat=chat)
    runs = [
        ("gsm8k", "generate", gsm8k, args.gsm8k_n, None, dict(max_new_tokens=args.max_new_tokens)),
        ("commonsenseqa", "loglik sum+mean", csqa, args.csqa_n, "mean", {}),
        ("commonsenseqa", "letter", csqa, args.csqa_n, "letter", {}),
    ]
    rows = []
    for name, mode, task, n, scoring, extra in runs:
        evaluate(
            task, model, tok, limit=1, seed=args.seed + 1, batch_size=1, scoring=scoring, **extra
        )  # warm-up
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = evaluate(
                task,
                model,
                tok,
                limit=n,
                seed=args.seed,
                batch_size=args.batch_size,
                scoring=scoring,
                **extra,
            )
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = min(times)
        indices = [r["index"] for r in result["records"]]
        prompt_tokens = mean_prompt_tokens(task, tok, indices, letter=scoring == "letter")
        acc = (
            f"{result['accuracy_sum']:.2f} / {result['accuracy_mean']:.2f}"
            if "accuracy_sum" in result
            else f"{result['accuracy']:.2f}"
        )
        completions = [r["completion"] for r in result["records"] if "completion" in r]
        new_tokens = (
            f"{sum(len(tok.encode(c, add_special_tokens=False)) for c in completions) / len(completions):.0f}"
            if completions
            else "-"
        )
        rows.append((name, mode, result["n"], seconds, result["n"] / seconds, acc, prompt_tokens, new_tokens))

    threads = torch.get_num_threads()
    print(
        f"\n{args.model} ({args.dtype}) on {args.device} ({threads} torch threads), "
        f"{'plain' if args.plain else 'chat'} prompts, batch size {args.batch_size}, "
        f"GSM8K max_new_tokens {args.max_new_tokens}, fastest of {args.repeats}\n"
    )
    header = [
        "task",
        "scoring",
        "n",
        "seconds",
        "examples/s",
        "accuracy",
        "mean prompt tokens",
        "mean generated tokens",
    ]
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mode, n, seconds, rate, acc, prompt_tokens, new_tokens in rows:
        cells = [name, mode, n, f"{seconds:.1f}", f"{rate:.2f}", acc, f"{prompt_tokens:.0f}", new_tokens]
        print("| " + " | ".join(map(str, cells)) + " |")
    print("\n(loglik accuracy: sum / per-token mean; chance is 0.20 for CommonsenseQA)")


if __name__ == "__main__":
    main()
