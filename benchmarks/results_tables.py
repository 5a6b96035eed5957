"""Markdown tables of a run's logged scalars (TensorBoard event files), for the README's results sections.

    python benchmarks/results_tables.py rounds <run folder> [<run folder> ...]
    python benchmarks/results_tables.py steps <run folder> --tags train/d_reasoning_length train/d_acc [--every 40] [--mean]

`rounds`: one row per round of an SFTKLBarrier run (round/index, round/trait, round/coherence and the
self-feeding pool's round/pool_* when logged). `steps`: the given tags at every `--every`-th logged step
(the last logged value at or before it; with `--mean`, the mean of the values logged since the previous row).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROUND_TAGS = ("round/trait", "round/coherence", "round/pool_kept", "round/pool_trait_kept",
              "round/pool_coherence", "round/pool_distinct", "round/pool_overlap")


def scalars(run: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file under `run` (later files win on equal steps)."""
    out: dict[str, dict[int, float]] = {}
    for events in sorted(run.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return str(int(value)) if float(value).is_integer() and abs(value) >= 1 else f"{value:.3f}"


def rounds_table(run: Path) -> str:
    s = scalars(run)
    index = s.get("round/index", {})
    tags = [t for t in ROUND_TAGS if t in s]
    lines = [f"{run}", "", "| round | step | " + " | ".join(t.split("/", 1)[1] for t in tags) + " |",
             "|" + "---|" * (len(tags) + 2)]
    for step, k in sorted(index.items()):
        lines.append(f"| {int(k)} | {step} | " + " | ".join(fmt(s[t].get(step)) for t in tags) + " |")
    return "\n".join(lines)


def steps_table(run: Path, tags: list[str], every: int, mean: bool = False) -> str:
    s = scalars(run)
    last = max((max(v) for t, v in s.items() if t in tags and v), default=0)
    lines = [f"{run}", "", "| step | " + " | ".join(tags) + " |", "|" + "---|" * (len(tags) + 1)]
    for target in [*range(every, last + 1, every), *([last] if last % every else [])]:
        row = []
        for t in tags:
            seen = [step for step in s.get(t, {}) if step <= target]
            if mean:
                window = [s[t][step] for step in seen if step > target - every]
                row.append(fmt(sum(window) / len(window)) if window else "–")
            else:
                row.append(fmt(s[t][max(seen)]) if seen else "–")
        lines.append(f"| {target} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("rounds", "steps"))
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--tags", nargs="*", default=[])
    parser.add_argument("--every", type=int, default=40)
    parser.add_argument("--mean", action="store_true", help="average each row's window instead of its last value")
    args = parser.parse_args()
    for run in args.runs:
        print(rounds_table(run) if args.mode == "rounds" else steps_table(run, args.tags, args.every, args.mean))
        print()


if __name__ == "__main__":
    main()
