"""Downstream reasoning accuracy of a model, with and without a `<think>` block: the table in docs/downstream.md.

For CommonsenseQA (dev, answer log-likelihood; per-token mean and sum) and GSM8K (test, greedy generation
through the chat template with a '#### <number>' instruction) it prints, on seeded subsets (`--csqa-n`,
`--gsm8k-n`; 0 = the whole file):

* the plain zero-shot accuracy (`lightning_rlm.tasks.evaluate`);
* seed 001's think-or-not probe (`lightning_rlm.tasks.think_or_not`) on a seeded subset of `--probe-n`
  examples: the accuracy after the model's own greedy thought in a `<think>` block (up to `--think-tokens`)
  and after the null thought "I will stick with my default distribution", and the share of answers the
  thought changed;
* the random-guess level beside each number, and the wall time.

    python benchmarks/reasoning_accuracy.py [--model lrlm:smollm2-135m-instruct | <HF folder>] \\
        [--csqa-n 0] [--gsm8k-n 200] [--probe-n 100] [--only csqa|gsm8k]

A checkpoint of any method can be scored the same way through the CLI instead:
`lightning-rlm validate --config <run>.yaml --config configs/presets/eval_reasoning.yaml --ckpt_path ...`.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_rlm.data.chat import ChatFormat
from lightning_rlm.models.base_model import resolve_model_path
from lightning_rlm.tasks import GSM8K, CommonsenseQA, evaluate, think_or_not

GSM8K_CHAT = ChatFormat(user_template="{text}\nSolve it step by step, then give the final answer on its own last "
                                      "line as '#### <number>'.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lrlm:smollm2-135m-instruct")
    p.add_argument("--csqa-n", type=int, default=0, help="CommonsenseQA dev questions (0: all 1,221)")
    p.add_argument("--gsm8k-n", type=int, default=200, help="GSM8K test problems (0: all)")
    p.add_argument("--probe-n", type=int, default=100, help="examples of the think-or-not probe (0: skip it)")
    p.add_argument("--think-tokens", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=192, help="GSM8K answer budget")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--only", choices=["csqa", "gsm8k"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tasks = []
    if a.only in (None, "csqa"):
        tasks.append((CommonsenseQA(), a.csqa_n, "0.20", "log-likelihood (mean / sum), plain prompt"))
    if a.only in (None, "gsm8k"):
        tasks.append((GSM8K(template="{question}", chat=GSM8K_CHAT, max_new_tokens=a.max_new_tokens), a.gsm8k_n,
                      "~0", "greedy, chat template"))
    print(f"model: {a.model}; seed {a.seed}")
    print("| task | scoring | n | accuracy | chance | probe n | after own thought | after null thought | "
          "changed | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for task, n, chance, how in tasks:
        t0 = time.perf_counter()
        r = evaluate(task, model, tok, limit=n or None, seed=a.seed, batch_size=a.batch_size)
        acc = f"{r['accuracy_mean']:.3f} / {r['accuracy_sum']:.3f}" if "accuracy_mean" in r else f"{r['accuracy']:.3f}"
        probe_cells = "| | | |"
        if a.probe_n:
            pr = think_or_not(task, model, tok, limit=a.probe_n, seed=a.seed, batch_size=a.batch_size,
                              think_tokens=a.think_tokens)
            probe_cells = (f"{pr['n']} | {pr['accuracy_thought']:.3f} | {pr['accuracy_null']:.3f} | "
                           f"{pr['changed']:.2f} |")
        print(f"| {task.name} | {how} | {r['n']} | {acc} | {chance} | {probe_cells} {time.perf_counter() - t0:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
