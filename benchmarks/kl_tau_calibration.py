"""Calibrate the KL barrier's `tau` per aggregator: the student's divergence on coherent vs looping text.

The barrier is `lam · relu(div − tau)`, `div` an aggregate over completion positions of the student's
per-position KL to its base (mean, rmse, p95, max, logsumexp: different scales, so one tau is a different
gate for each). What the barrier should do: stay off while the student writes coherent text, fire when
it loops. So tau is read off the student's own generations:

1. Train a run whose generations include loops (e.g. a self-feeding loop with the mean aggregate or
   `lam: 0`, `configs/sft_kl_barrier/loop_mean.yaml`) and keep a checkpoint of the student at a round whose
   `generations_round_<k>.jsonl` / `pool_round_<k>.jsonl` has both kinds (`loop` true and false: the
   coherence test's flag, a word 4-gram repeated 3+ times).
2. Run this script on that checkpoint and those files. Each generation is teacher-forced through the student
   and its base (the prompt and completion re-encoded from the file's text, without special tokens), and
   every aggregator of its per-position KL (`direction`, default: the run's) is taken over its own
   completion positions (as `SFTKLBarrier.sequence_divergences` does).
3. Per aggregator, `suggest_tau` compares the coherent and the looping sequences: AUC (the chance a looping
   sequence scores above a coherent one: how well the aggregator tells them apart) and a tau between the
   coherent 90th and looping 10th percentiles (geometric mean) when they separate, else between the medians.

Without loops in the files, `--synthetic-loops` adds a looping twin of each coherent generation (its first
`--loop-words` words repeated to its length in words): the student's divergence on text it did not write,
a weaker proxy. The values are per sequence; a training batch pools the positions of its B sequences, so
one looping sequence among B moves the batch mean ~B times less, rmse ~sqrt(B) times less, max not at all:
pick tau for the batch aggregate with that in mind (or calibrate with `--pool B`, which aggregates each
looping sequence together with B − 1 coherent ones, the batch the barrier would actually see).

    python benchmarks/kl_tau_calibration.py --ckpt runs/sft_kl_barrier/loop_mean/version_0/checkpoints/last.ckpt \\
        --generations runs/sft_kl_barrier/loop_mean/version_0/pool_round_7.jsonl [--synthetic-loops] [--pool 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_rlm.data.collate import DictCollator
from lightning_rlm.losses.kl import aggregate_kl, per_position_kl, suggest_tau
from lightning_rlm.methods.sft_kl_barrier import LOGGED_AGGREGATES, SFTKLBarrier


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        rows += [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("completion", "").strip()]


def looping_twin(row: dict, words: int) -> dict:
    """The same prompt, the completion's first `words` words repeated to its length in words."""
    text = row["completion"].split()
    head = text[:words] or ["the"]
    loop = (head * (len(text) // len(head) + 3))[: max(len(text), 3 * len(head))]
    return {**row, "completion": " " + " ".join(loop), "loop": True}


@torch.no_grad()
def divergences(module: SFTKLBarrier, rows: list[dict], batch_size: int, pool: int) -> dict[str, list[float]]:
    """Each aggregator per row (pool == 1), or per batch of one row with pool − 1 coherent ones (pool > 1)."""
    tok, device = module.tokenizer, module.device
    collate = DictCollator(tok.pad_token_id)
    examples = [{"prompt_ids": tok.encode(r["prompt"], add_special_tokens=False) or [tok.eos_token_id],
                 "completion_ids": tok.encode(r["completion"], add_special_tokens=False)} for r in rows]
    kls = []  # per row: its per-position KL [C] over its completion positions
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        kl = per_position_kl(module.completion_logits(module.policy, batch), module.base_logits(batch),
                             module.hparams.direction)  # [b, C]
        for i in range(len(kl)):
            m = batch["completion_mask"][i].bool()
            kls.append(kl[i][m])
    out: dict[str, list[float]] = {how: [] for how in LOGGED_AGGREGATES}
    coherent = [k for k, r in zip(kls, rows) if not r["loop"]]
    for i, kl in enumerate(kls):
        group = [kl]
        if pool > 1:  # this sequence among pool - 1 coherent others (the next ones, cyclically)
            others = [c for c in coherent if c is not kl]
            group += [others[(i + j) % len(others)] for j in range(pool - 1)] if others else []
        values = torch.cat(group)
        masks = torch.ones_like(values, dtype=torch.bool)
        for how in LOGGED_AGGREGATES:
            out[how].append(aggregate_kl(values[None], masks[None], how).item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="an SFTKLBarrier checkpoint (the student and its base)")
    parser.add_argument("--generations", nargs="+", required=True,
                        help="generations_round_<k>.jsonl / pool_round_<k>.jsonl files (prompt, completion, loop)")
    parser.add_argument("--direction", choices=["kl_rev", "kl_fwd"], default=None, help="default: the run's")
    parser.add_argument("--synthetic-loops", action="store_true", help="add a looping twin of each coherent row")
    parser.add_argument("--loop-words", type=int, default=4, help="words repeated in a synthetic loop")
    parser.add_argument("--pool", type=int, default=1, help="aggregate each sequence with pool - 1 coherent ones")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="at most this many rows of the files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()

    module = SFTKLBarrier.load_from_checkpoint(args.ckpt, map_location=args.device, weights_only=False)
    module.eval()
    if args.direction:
        module.hparams.direction = args.direction
    rows = read_rows(args.generations)[: args.limit]
    if args.synthetic_loops:
        rows += [looping_twin(r, args.loop_words) for r in rows if not r["loop"]]
    n_loop = sum(bool(r["loop"]) for r in rows)
    if not n_loop or n_loop == len(rows):
        raise SystemExit(f"{len(rows)} rows, {n_loop} looping: need both kinds (try --synthetic-loops)")
    values = divergences(module, rows, args.batch_size, args.pool)
    table = {}
    print(f"{module.hparams.direction}, {len(rows) - n_loop} coherent / {n_loop} looping sequences, pool {args.pool}; "
          f"the run's aggregate {module.hparams.aggregate}, tau {module.hparams.tau}")
    print(f"{'aggregate':>10} {'coh p50':>9} {'coh p90':>9} {'loop p10':>9} {'loop p50':>9} {'AUC':>6} "
          f"{'separable':>9} {'tau':>9}")
    for how, vals in values.items():
        s = suggest_tau([v for v, r in zip(vals, rows) if not r["loop"]], [v for v, r in zip(vals, rows) if r["loop"]])
        table[how] = s
        print(f"{how:>10} {s['coherent_median']:9.4f} {s['coherent_p90']:9.4f} {s['looping_p10']:9.4f} "
              f"{s['looping_median']:9.4f} {s['auc']:6.3f} {str(s['separable']):>9} {s['tau']:9.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
