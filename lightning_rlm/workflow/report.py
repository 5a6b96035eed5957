"""`lightning-rlm report`: a results table across seeds from a sweep folder's logs (TensorBoard or CSV).

    lightning-rlm report SWEEP_DIR [--metric val/loss --metric train/kl ...]
                         [--threshold train/reward=0.85 ...] [--out DIR] [--plot]

Runs are grouped by setting (their grid values except the seed, from `sweep.json`); each row gives the
number of seeds found (`n`), for each metric the mean ± std over seeds of its final (last logged) value,
and for each threshold the mean over seeds of the first step, and of the wall-clock seconds since the
run's first event, at which the metric reaches the value (`(k/n)` when only k seeds got there, n/a when
none did). `TAG=VALUE` means "rises to" for metrics that go up over the runs and "falls to" for those
that go down; `TAG>=VALUE` / `TAG<=VALUE` say it explicitly. The table is printed and written to
`report.md` and `report.csv` (in SWEEP_DIR or `--out`); `--plot` adds one PNG of curves per metric.

Without `sweep.json` (any folder of runs), each subfolder holding event files is a run named by its
folder; names such as `lr=1e-4,seed=1` (the sweep's) are still grouped over `seed=...`.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lightning_rlm.workflow.sweep import DONE_FILE, SEED_KEYS, is_seed_key, read_sweep, setting_name

EVENTS_GLOB = "events.out.tfevents.*"
CSV_NAME = "metrics.csv"  # what Lightning's CSVLogger writes
IGNORED_TAGS = ("hp_metric",)

Point = tuple[int, float, float]  # (step, value, wall time)


@dataclass
class RunData:
    """One run's scalars: tag → points sorted by step (one per step, the latest written)."""

    name: str
    setting: str
    folder: Path
    scalars: dict[str, list[Point]] = field(default_factory=dict)
    start: float = 0.0  # wall time of the run's first event
    done: Optional[bool] = None  # DONE marker present (None: not a sweep run)


@dataclass
class Threshold:
    tag: str
    op: str  # ">=", "<=" or "=" (direction inferred from the runs)
    value: float

    @property
    def label(self) -> str:
        return f"{self.tag}{'' if self.op == '=' else self.op[0]}={self.value:g}"


# ----- reading events ------------------------------------------------------------------------------------------
def load_scalars(folder: Path) -> tuple[dict[str, list[Point]], float]:
    """All scalars under `folder`: TensorBoard event files, and CSVLogger `metrics.csv` files (resumed runs
    append files: later writes win)."""
    merged: dict[str, dict[int, tuple[float, float]]] = {}
    start = float("inf")

    def add(tag: str, step: int, value: float, wall: float) -> None:
        if tag in IGNORED_TAGS:
            return
        points = merged.setdefault(tag, {})
        if step not in points or wall >= points[step][1]:
            points[step] = (value, wall)

    event_files = sorted(folder.rglob(EVENTS_GLOB))
    if event_files:
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    for path in event_files:
        acc = EventAccumulator(str(path), size_guidance={SCALARS: 0}).Reload()  # 0: keep every point
        try:
            start = min(start, acc.FirstEventTimestamp())
        except ValueError:  # an empty file
            continue
        for tag in acc.Tags()["scalars"]:
            for ev in acc.Scalars(tag):
                add(tag, ev.step, ev.value, ev.wall_time)
    for path in sorted(folder.rglob(CSV_NAME)):
        # CSVLogger: one row per logging call, a column per metric (empty where not logged); no wall time, so
        # the file's modification time stands for all its rows (thresholds' seconds are n/a for CSV-only runs)
        wall = path.stat().st_mtime
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                if not step:
                    continue
                for tag, value in row.items():
                    if tag in ("step", "epoch") or value in ("", None):
                        continue
                    try:
                        add(tag, int(float(step)), float(value), wall)
                    except ValueError:
                        continue
    scalars = {tag: [(s, v, w) for s, (v, w) in sorted(pts.items())] for tag, pts in merged.items()}
    return scalars, (start if scalars and start != float("inf") else 0.0)


def has_events(folder: Path) -> bool:
    return any(folder.rglob(EVENTS_GLOB)) or any(folder.rglob(CSV_NAME))


def setting_from_name(name: str) -> str:
    """`lr=1e-4,seed=1` → `lr=1e-4`; names not made of `key=value` parts are their own setting."""
    parts = name.split(",")
    if not all("=" in p for p in parts):
        return name
    kept = [p for p in parts if p.partition("=")[0] not in SEED_KEYS]
    return ",".join(kept) or "all"


def find_runs(sweep_dir: Path) -> tuple[list[RunData], list[str], Optional[dict]]:
    """The runs with events (in sweep order), the names of sweep runs without any, and sweep.json."""
    info = read_sweep(sweep_dir)
    runs: list[RunData] = []
    missing: list[str] = []
    if info is not None:
        grids = info["grids"]
        for entry in info["runs"]:
            folder = sweep_dir / entry["name"]
            if not has_events(folder):
                missing.append(entry["name"])
                continue
            setting = entry.get("setting") or setting_name(entry["values"], grids)
            runs.append(RunData(entry["name"], setting, folder, done=(folder / DONE_FILE).exists()))
    else:
        folders = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and has_events(p))
        if not folders and (any(sweep_dir.glob(EVENTS_GLOB)) or (sweep_dir / CSV_NAME).exists()):
            folders = [sweep_dir]
        runs = [RunData(p.name, setting_from_name(p.name), p) for p in folders]
    for run in runs:
        run.scalars, run.start = load_scalars(run.folder)
    return runs, missing, info


# ----- statistics ----------------------------------------------------------------------------------------------
def parse_threshold(spec: str) -> Threshold:
    m = re.fullmatch(r"\s*(.+?)\s*(>=|<=|=)\s*([^=<>]+?)\s*", spec)
    try:
        if m is None:
            raise ValueError
        return Threshold(m.group(1), m.group(2), float(m.group(3)))
    except ValueError:
        raise ValueError(f"bad --threshold {spec!r}: expected TAG=VALUE, TAG>=VALUE or TAG<=VALUE") from None


def rises(tag: str, runs: list[RunData]) -> bool:
    """Whether `tag` goes up over the runs (mean of last - first), for thresholds given as TAG=VALUE."""
    deltas = [r.scalars[tag][-1][1] - r.scalars[tag][0][1] for r in runs if r.scalars.get(tag)]
    return not deltas or statistics.fmean(deltas) >= 0


def first_reach(points: list[Point], value: float, up: bool) -> Optional[Point]:
    for point in points:
        if (point[1] >= value) if up else (point[1] <= value):
            return point
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def group(runs: list[RunData]) -> dict[str, list[RunData]]:
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    return groups


@dataclass
class Row:
    setting: str
    n: int
    finals: dict[str, list[float]]  # metric → the final value of each seed that logged it
    reach_steps: dict[str, list[int]]  # threshold label → first step of each seed that reached it
    reach_seconds: dict[str, list[float]]


def summarize(runs: list[RunData], metrics: list[str], thresholds: list[Threshold]) -> list[Row]:
    directions = {t.label: (t.op == ">=") if t.op != "=" else rises(t.tag, runs) for t in thresholds}
    rows = []
    for setting, members in group(runs).items():
        finals = {m: [r.scalars[m][-1][1] for r in members if r.scalars.get(m)] for m in metrics}
        steps: dict[str, list[int]] = {}
        seconds: dict[str, list[float]] = {}
        for t in thresholds:
            steps[t.label], seconds[t.label] = [], []
            for r in members:
                hit = first_reach(r.scalars.get(t.tag, []), t.value, directions[t.label])
                if hit is not None:
                    steps[t.label].append(hit[0])
                    seconds[t.label].append(hit[2] - r.start)
        rows.append(Row(setting, len(members), finals, steps, seconds))
    return rows


# ----- tables --------------------------------------------------------------------------------------------------
def fmt_mean_std(values: list[float], n: int) -> str:
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    text = f"{mean:.4g} ± {std:.2g}" if len(values) > 1 else f"{mean:.4g}"
    return text if len(values) == n else f"{text} ({len(values)}/{n})"


def fmt_reach(values: list[float], n: int, digits: int) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    text = f"{mean:.0f}" if digits == 0 and mean == int(mean) else f"{mean:.{max(digits, 1)}f}"
    return text if len(values) == n else f"{text} ({len(values)}/{n})"


def table(rows: list[Row], metrics: list[str], thresholds: list[Threshold]) -> tuple[list[str], list[list[str]]]:
    header = ["setting", "n", *metrics]
    for t in thresholds:
        header += [f"step to {t.label}", f"seconds to {t.label}"]
    body = []
    for row in rows:
        cells = [row.setting, str(row.n), *(fmt_mean_std(row.finals[m], row.n) for m in metrics)]
        for t in thresholds:
            cells += [fmt_reach(row.reach_steps[t.label], row.n, 0), fmt_reach(row.reach_seconds[t.label], row.n, 1)]
        body.append(cells)
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    aligns = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join([line(header), "| " + " | ".join(aligns) + " |", *(line(r) for r in body)]) + "\n"


def csv_text(rows: list[Row], metrics: list[str], thresholds: list[Threshold]) -> str:
    """Machine-readable numbers: mean, std and count per metric; mean step/seconds and count per threshold."""
    buf = io.StringIO()
    w = csv.writer(buf)
    header = ["setting", "n"]
    for m in metrics:
        header += [f"{m} mean", f"{m} std", f"{m} n"]
    for t in thresholds:
        header += [f"step to {t.label}", f"seconds to {t.label}", f"reached {t.label}"]
    w.writerow(header)
    for row in rows:
        cells: list[object] = [row.setting, row.n]
        for m in metrics:
            vals = row.finals[m]
            cells += [*mean_std(vals), len(vals)] if vals else ["", "", 0]
        for t in thresholds:
            st, sec = row.reach_steps[t.label], row.reach_seconds[t.label]
            cells += [statistics.fmean(st), statistics.fmean(sec), len(st)] if st else ["", "", 0]
        w.writerow(cells)
    return buf.getvalue()


# ----- plots ---------------------------------------------------------------------------------------------------
def plot_metrics(runs: list[RunData], metrics: list[str], out: Path) -> list[Path]:
    """One PNG per metric: mean over seeds (line) ± std (band), one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for setting, members in group(runs).items():
            curves = [np.array(r.scalars[metric])[:, :2] for r in members if r.scalars.get(metric)]
            if not curves:
                continue
            lo, hi = max(c[0, 0] for c in curves), min(c[-1, 0] for c in curves)
            steps = np.unique(np.concatenate([c[:, 0] for c in curves]))
            steps = steps[(steps >= lo) & (steps <= hi)] if lo <= hi else curves[0][:, 0]
            ys = np.stack([np.interp(steps, c[:, 0], c[:, 1]) for c in curves])  # seeds on the same steps
            mean, std = ys.mean(0), ys.std(0)
            (line,) = ax.plot(steps, mean, label=f"{setting} (n={len(curves)})", marker="." if len(steps) < 20 else None)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set(xlabel="step", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        path = out / f"curves_{re.sub(r'[^A-Za-z0-9._-]', '_', metric)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ----- command line --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-rlm report",
                                description="Final metrics (mean ± std over seeds) and time to thresholds "
                                            "of the runs of a sweep folder.")
    p.add_argument("sweep_dir", help="a sweep folder (with sweep.json) or any folder of run folders")
    p.add_argument("--metric", action="append", default=[], metavar="TAG",
                   help="a scalar tag (repeat; default: every val/ tag, else every tag)")
    p.add_argument("--threshold", action="append", default=[], metavar="TAG=VALUE",
                   help="time to reach VALUE (TAG>=VALUE / TAG<=VALUE to set the direction; repeat)")
    p.add_argument("--out", help="folder for report.md, report.csv and plots (default: SWEEP_DIR)")
    p.add_argument("--plot", action="store_true", help="also write curves_<metric>.png")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir!r} is not a folder")
    try:
        thresholds = [parse_threshold(s) for s in args.threshold]
    except ValueError as e:
        parser.error(str(e))

    runs, missing, info = find_runs(sweep_dir)
    if not runs:
        parser.error(f"no TensorBoard event files under {sweep_dir}")
    tags = sorted({t for r in runs for t in r.scalars})
    metrics = args.metric or [t for t in tags if t.startswith("val/")] or tags
    unknown = [m for m in [*metrics, *(t.tag for t in thresholds)] if m not in tags]
    if unknown:
        parser.error(f"no run logged {', '.join(map(repr, unknown))}; logged tags: {', '.join(tags)}")

    rows = summarize(runs, metrics, thresholds)
    header, body = table(rows, metrics, thresholds)
    title = f"# {sweep_dir.resolve().name}" + (f": {info['tag']}" if info and info.get("tag") else "")
    notes = []
    if info:
        notes.append(f"config `{info['config']}`, grids " + ", ".join(
            f"`{k}`={','.join(v)}" for k, v in info["grids"].items() if len(v) > 1 or is_seed_key(k)))
    notes.append("final (last logged) values, mean ± std over seeds; time to threshold: mean over the "
                 "seeds that reached it, seconds since the run's first event")
    unfinished = [r.name for r in runs if r.done is False]
    if unfinished:
        notes.append(f"unfinished (no {DONE_FILE}): {', '.join(unfinished)}")
    if missing:
        notes.append(f"no events yet: {', '.join(missing)}")
    text = "\n".join([title, "", *(f"- {n}" for n in notes), "", markdown(header, body)])

    out = Path(args.out) if args.out else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    (out / "report.csv").write_text(csv_text(rows, metrics, thresholds))
    print(text)
    print(f"wrote {out / 'report.md'} and {out / 'report.csv'}")
    if args.plot:
        for path in plot_metrics(runs, metrics, out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
