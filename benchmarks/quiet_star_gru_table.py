"""Baseline GRU LM vs Quiet-STaR GRU: val NLL at a fixed step budget, mean ± std over seeds (CPU).

Each (config, seed) is one `lightning-rlm fit` of a `configs/quiet_star_gru` YAML with the step budget
and seed overridden (the seed also reseeds the data order), then one validation of the final weights
on the same `--val-batches` batches. Runs log under `--out`.

    python benchmarks/quiet_star_gru_table.py [--steps 300] [--seeds 3] [--configs baseline reasoner_128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lightning_rlm.cli import RLMCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quiet_star_gru"


def run(config: str, seed: int, steps: int, val_batches: int, out: Path) -> tuple[float, float]:
    """Train one config for `steps` at `seed`; returns (final val NLL, seconds)."""
    t0 = time.perf_counter()
    cli = RLMCLI(args=[
        "fit", "--config", str(CONFIGS / f"{config}.yaml"), f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}", f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu",
        f"--trainer.limit_val_batches={val_batches}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.logger.init_args.name", f"{config}/seed_{seed}",
    ])
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return metrics["val/nll"], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=["baseline", "reasoner_128"],
                        help="names in configs/quiet_star_gru")
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/quiet_star_gru_table"))
    args = parser.parse_args()

    results: dict[str, list[tuple[float, float]]] = {}
    for config in args.configs:
        results[config] = [run(config, seed, args.steps, args.val_batches, args.out)
                           for seed in range(1, args.seeds + 1)]

    print(f"\n{args.steps} steps, seeds 1..{args.seeds}, {args.val_batches} val batches, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"| {'config':26} | {'val NLL':>15} | {'per seed':30} | {'min/run':>7} |")
    print(f"|{'-' * 28}|{'-' * 17}|{'-' * 32}|{'-' * 9}|")
    for config, rs in results.items():
        nlls = [r[0] for r in rs]
        std = statistics.stdev(nlls) if len(nlls) > 1 else float("nan")
        per_seed = ", ".join(f"{x:.3f}" for x in nlls)
        minutes = statistics.mean(r[1] for r in rs) / 60
        print(f"| {config:26} | {statistics.mean(nlls):>7.3f} ± {std:<5.3f} | {per_seed:30} | {minutes:>7.1f} |")


if __name__ == "__main__":
    main()
