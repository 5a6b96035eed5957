"""`lightning-rlm sweep`: a grid of `fit` runs from one command, locally or as a SLURM job array.

    lightning-rlm sweep --config configs/grpo/x.yaml \\
        --grid model.init_args.beta=0.003,0.01,0.02 --grid seed_everything=42,123 --tag "beta sweep" \\
        [--out runs/sweeps] [--name NAME] [--launcher local|slurm] [--jobs N] [--dry-run] [-- extra args]

Every point of the Cartesian product of the grids is one run, named after its varied values
(`beta=0.003,seed=42`), in `<out>/<sweep name>/<run>/`: TensorBoard events in `tb/version_0/`,
checkpoints in `checkpoints/`, stdout/stderr in `log.txt` and a `DONE` marker once `fit` exited with 0.
`sweep.json` in the sweep folder records the config, grids, tag and runs; `lightning-rlm report` reads it.

Why runs are plain subprocesses of the CLI: a run of the sweep is exactly the command one would type,
so it can be copied from `--dry-run` or `log.txt` and debugged alone. Re-running the same sweep
(same `--name`) skips runs with `DONE` and resumes the others from their `last.ckpt`, so a crashed,
preempted or timed-out sweep is finished by running its command again. A run stopped by a signal exits
non-zero (143 for SIGTERM) after writing its `last.ckpt`, so it gets no `DONE`; a sweep that receives
SIGTERM or Ctrl-C passes SIGTERM on to its running runs, starts no new one, and exits 143. On SLURM the scheduling is
submitit's (one job array, at most `--array-parallelism` jobs at a time); submitit is an optional extra.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

SEED_KEYS = ("seed_everything", "seed")  # last dotted key components treated as seeds (not settings)
SWEEP_FILE = "sweep.json"
DONE_FILE = "DONE"
LOG_FILE = "log.txt"
MAX_VALUE_CHARS = 32  # per value in a run name
MAX_NAME_CHARS = 150
STOPPED_EXIT_CODE = 143  # a run or sweep stopped by a signal (128 + SIGTERM)
_children: set[subprocess.Popen] = set()  # running `fit` processes of the local launcher
_stop = threading.Event()  # set by SIGTERM / Ctrl-C: no new run starts


@dataclass
class Run:
    """One point of the grid: its folder name, grid values and CLI overrides."""

    name: str
    values: dict[str, str]
    overrides: list[str]


# ----- grids and names ------------------------------------------------------------------------------------
def split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes, so `[1,2],[3,4]` gives two list values.

    Unbalanced brackets or an open quote are a ValueError (each run would otherwise fail on its own).
    """
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced {ch!r} in {text!r}")
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if depth or quote:
        raise ValueError(f"unclosed {'quote' if quote else 'bracket'} in {text!r}")
    parts.append("".join(cur).strip())
    return parts


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """`KEY=V1,V2,...` → (KEY, [V1, V2, ...]); ValueError naming `spec` when malformed."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key or key.startswith("-") or any(c.isspace() for c in key):
        raise ValueError(f"bad --grid {spec!r}: expected KEY=V1,V2,... (e.g. model.init_args.lr=1e-4,3e-4)")
    try:
        vals = split_values(values)
    except ValueError as e:
        raise ValueError(f"bad --grid {spec!r}: {e} (expected KEY=V1,V2,... with balanced brackets)") from e
    if any(v == "" for v in vals):
        raise ValueError(f"bad --grid {spec!r}: empty value (expected KEY=V1,V2,... with no empty items)")
    return key, vals


def expand_grid(grids: dict[str, list[str]]) -> list[dict[str, str]]:
    """Cartesian product, first grid varying slowest."""
    keys = list(grids)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grids[k] for k in keys))]


def is_seed_key(key: str) -> bool:
    return key.split(".")[-1] in SEED_KEYS


def short_keys(keys: list[str]) -> dict[str, str]:
    """Last dotted component (`seed_everything` → `seed`), more components where two would collide."""
    parts = {k: [p for p in k.split(".") if p != "init_args"] for k in keys}
    depth = dict.fromkeys(keys, 1)

    def short(k: str) -> str:
        name = ".".join(parts[k][-depth[k]:])
        return "seed" if name == "seed_everything" else name

    while True:
        seen: dict[str, list[str]] = {}
        for k in keys:
            seen.setdefault(short(k), []).append(k)
        clashes = [k for ks in seen.values() if len(ks) > 1 for k in ks if depth[k] < len(parts[k])]
        if not clashes:
            return {k: short(k) for k in keys}
        for k in clashes:
            depth[k] += 1


def _sanitised(value: str) -> str:
    """A value as it can appear in a folder name, before the cap: basename of paths, odd characters → `_`."""
    if "/" in value.strip("/"):
        value = value.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", value).strip("_") or "_"


def safe_value(value: str) -> str:
    """A value as it can appear in a folder name: basename of paths, odd characters → `_`, capped."""
    return _sanitised(value)[:MAX_VALUE_CHARS]


def run_name(values: dict[str, str], varied: list[str], short: dict[str, str]) -> str:
    """`beta=0.003,seed=42` from the varied keys of one grid point (`run` when nothing varies)."""
    name = ",".join(f"{short[k]}={safe_value(values[k])}" for k in varied) or "run"
    return name


def _shortened(value: str) -> bool:
    """Whether `safe_value` loses more than odd characters: a path cut to its basename or a value cut short."""
    return "/" in value.strip("/") or len(_sanitised(value)) > MAX_VALUE_CHARS


def setting_name(values: dict[str, str], grids: dict[str, list[str]]) -> str:
    """The run's setting: its varied grid values except the seed (what `report` groups seeds by). When a value
    had to be shortened (a path's basename, a value cut to MAX_VALUE_CHARS), a digest of the full values follows,
    so two settings that share the short form stay apart."""
    varied = [k for k, v in grids.items() if len(v) > 1 and not is_seed_key(k)]
    if not varied:
        return "all"
    name = run_name(values, varied, short_keys(list(grids)))
    if any(_shortened(values[k]) for k in varied):
        name += "-" + _digest(" ".join(f"{k}={values[k]}" for k in varied))
    return name


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def plan_sweep(grids: dict[str, list[str]]) -> list[Run]:
    """All runs of the grid, with unique, filesystem-safe names."""
    short = short_keys(list(grids))
    varied = [k for k, v in grids.items() if len(v) > 1]
    runs, seen = [], set()
    for values in expand_grid(grids):
        overrides = [f"--{k}={v}" for k, v in values.items()]
        name = run_name(values, varied, short)
        if name in seen or len(name) > MAX_NAME_CHARS:  # clash after sanitising, or too long: add a digest
            name = f"{name[:MAX_NAME_CHARS]}-{_digest(' '.join(overrides))}"
        seen.add(name)
        runs.append(Run(name, values, overrides))
    return runs


# ----- commands ---------------------------------------------------------------------------------------------
def run_paths_args(run_dir: Path) -> list[str]:
    """Send a run's TensorBoard logs to `<run>/tb/version_0` and its checkpoints to `<run>/checkpoints`."""
    return [
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.logger.init_args.name=tb",
        "--trainer.logger.init_args.version=0",
        f"--checkpoint.dirpath={run_dir / 'checkpoints'}",
    ]


def last_checkpoint(run_dir: Path) -> Optional[Path]:
    path = run_dir / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


def with_resume(cmd: list[str], run_dir: Path) -> list[str]:
    """Add `--ckpt_path <run>/checkpoints/last.ckpt` when that checkpoint exists (and none is given)."""
    ckpt = last_checkpoint(run_dir)
    if ckpt is None or any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in cmd):
        return cmd
    return [*cmd, "--ckpt_path", str(ckpt)]


def build_command(config: Path, run: Run, run_dir: Path, extra: list[str]) -> list[str]:
    """`python -m lightning_rlm fit --config CFG [extra] [grid overrides] [run folders] [--ckpt_path]`.

    The grid overrides come after the extra args so they win, the run's own folders last of all.
    """
    cmd = [sys.executable, "-m", "lightning_rlm", "fit", "--config", str(config), *extra, *run.overrides,
           *run_paths_args(run_dir)]
    return with_resume(cmd, run_dir)


def run_status(run_dir: Path) -> str:
    if (run_dir / DONE_FILE).exists():
        return "done"
    return "resume" if last_checkpoint(run_dir) else "new"


def run_one(cmd: list[str], run_dir: str) -> int:
    """Run one `fit` command, appending its output to `<run>/log.txt`; write `DONE` on exit code 0.

    Top-level and self-contained so submitit can pickle it. Under SLURM with several tasks (multi-GPU
    runs), every task runs the command (Lightning reads its rank from the SLURM environment), the
    non-zero ranks log to `log.rank<R>.txt` and only rank 0 writes `DONE`.
    """
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = with_resume(list(cmd), folder)  # a requeued job may find a checkpoint its submission did not
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    log = folder / (LOG_FILE if rank == 0 else f"log.rank{rank}.txt")
    with open(log, "a") as f:
        f.write(f"=== {datetime.now().isoformat(timespec='seconds')} {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _children.add(proc)
        try:
            code = proc.wait()
        finally:
            _children.discard(proc)
        f.write(f"=== exit code {code}\n")
    if code == 0 and rank == 0:
        (folder / DONE_FILE).write_text(f"{datetime.now().isoformat(timespec='seconds')}\n")
    return code


# ----- launchers -------------------------------------------------------------------------------------------
def launch_local(tasks: list[tuple[str, list[str], Path]], jobs: int) -> list[str]:
    """Run the tasks (name, command, folder), `jobs` at a time; returns the names of the failed ones."""
    failed: list[str] = []

    def one(task: tuple[str, list[str], Path]) -> None:
        name, cmd, folder = task
        if _stop.is_set():
            return
        start = time.perf_counter()
        print(f"[start] {name}", flush=True)
        try:
            code = run_one(cmd, str(folder))
        except OSError as e:  # e.g. the interpreter vanished: report it as a failed run
            code = -1
            print(f"[error] {name}: {e}", flush=True)
        took = time.perf_counter() - start
        if code == 0:
            print(f"[done]  {name} ({took:.0f} s)", flush=True)
        else:
            failed.append(name)
            print(f"[FAIL]  {name}: exit code {code} after {took:.0f} s, see {folder / LOG_FILE}", flush=True)

    def forward(signum: int, frame: Any) -> None:  # stop: each running run saves last.ckpt and exits 143
        _stop.set()
        for proc in list(_children):
            proc.send_signal(signal.SIGTERM)

    _stop.clear()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(one, tasks))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return failed


def _param_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def slurm_parameters(args: argparse.Namespace, name: str, n_runs: int) -> dict[str, Any]:
    """submitit `update_parameters` for the sweep's job array."""
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": args.time_min,
        "gpus_per_node": args.gpus,
        "tasks_per_node": max(1, args.gpus),  # Lightning expects one SLURM task per device
        "slurm_array_parallelism": args.array_parallelism or n_runs,
    }
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    for item in args.slurm_param:
        key, _, value = item.partition("=")
        params[key.strip()] = _param_value(value.strip())
    return params


def launch_slurm(tasks: list[tuple[str, list[str], Path]], sweep_dir: Path, params: dict[str, Any]) -> list[str]:
    """Submit the tasks as one SLURM job array through submitit; returns the job ids (does not wait)."""
    try:
        import submitit
    except ImportError as e:
        raise RuntimeError(
            "the slurm launcher needs submitit: pip install submitit (or pip install 'lightning_rlm[slurm]')"
        ) from e
    executor = submitit.AutoExecutor(folder=str(sweep_dir / "slurm" / "%j"), cluster="slurm")
    executor.update_parameters(**params)
    jobs = executor.map_array(run_one, [cmd for _, cmd, _ in tasks], [str(folder) for _, _, folder in tasks])
    return [str(job.job_id) for job in jobs]


# ----- sweep.json --------------------------------------------------------------------------------------------
def read_sweep(sweep_dir: Path) -> Optional[dict[str, Any]]:
    path = sweep_dir / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_sweep(sweep_dir: Path, info: dict[str, Any]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / f".{SWEEP_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(sweep_dir / SWEEP_FILE)


# ----- command line ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-rlm sweep",
        description="Run `lightning-rlm fit` on every point of a grid; re-run the same command to resume.",
        epilog="Arguments after `--` are passed to every run, e.g. -- --trainer.max_steps=500",
    )
    p.add_argument("--config", required=True, help="the base config of every run")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a CLI key and its values (repeat for a Cartesian product); seed_everything=... for seeds")
    p.add_argument("--tag", default="", help="free text recorded in sweep.json and shown by report")
    p.add_argument("--out", default="runs/sweeps", help="parent folder of sweep folders (default: runs/sweeps)")
    p.add_argument("--name", help="sweep folder name (default: config stem + date); reuse it to resume")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local")
    p.add_argument("--jobs", type=int, default=1, help="local launcher: runs at the same time (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their commands, launch nothing")
    s = p.add_argument_group("slurm launcher (submitit)")
    s.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    s.add_argument("--time-min", type=int, default=240, help="time limit of each run in minutes (default 240)")
    s.add_argument("--gpus", type=int, default=1, help="GPUs per run (default 1)")
    s.add_argument("--cpus-per-task", type=int, help="CPUs per task")
    s.add_argument("--array-parallelism", type=int, help="at most this many runs at a time (default: all)")
    s.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other submitit parameter, e.g. slurm_account=abc or mem_gb=64")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)

    config = Path(args.config).expanduser().resolve()
    if not config.is_file():
        parser.error(f"config {args.config!r} not found")
    if not args.grid:
        parser.error("give at least one --grid KEY=V1,V2,...")
    grids: dict[str, list[str]] = {}
    for spec in args.grid:
        try:
            key, values = parse_grid(spec)
        except ValueError as e:
            parser.error(str(e))
        if key in grids:
            parser.error(f"bad --grid {spec!r}: {key} is already swept by another --grid")
        grids[key] = values
    for item in args.slurm_param:
        if "=" not in item or not item.partition("=")[0].strip():
            parser.error(f"bad --slurm-param {item!r}: expected KEY=VALUE")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")

    name = args.name or f"{config.stem}-{datetime.now():%Y%m%d-%H%M%S}"
    if not name or "/" in name or name in (".", ".."):
        parser.error(f"bad --name {args.name!r}: expected a folder name")
    sweep_dir = (Path(args.out) / name).resolve()
    previous = read_sweep(sweep_dir)
    if previous is not None and (previous.get("config") != str(config) or previous.get("grids") != grids):
        parser.error(f"{sweep_dir} holds another sweep (different config or grids); choose another --name")

    runs = plan_sweep(grids)
    tasks = []
    status = {}
    for run in runs:
        folder = sweep_dir / run.name
        status[run.name] = run_status(folder)
        tasks.append((run.name, build_command(config, run, folder, extra), folder))
    todo = [t for t in tasks if status[t[0]] != "done"]
    params = slurm_parameters(args, name, len(todo)) if args.launcher == "slurm" else None

    print(f"sweep {name}: {len(runs)} runs in {sweep_dir}" + (f" ({args.tag})" if args.tag else ""))
    for run_name_, cmd, _ in tasks:
        print(f"  [{status[run_name_]}] {run_name_}")
        if args.dry_run:
            print(f"      {shlex.join(cmd)}")
    if args.dry_run:
        if params is not None:
            print(f"slurm parameters: {params}")
        print("dry run: nothing launched")
        return 0
    if not todo:
        print("every run is done")
        return 0

    now = datetime.now().isoformat(timespec="seconds")
    info = {
        "config": str(config),
        "grids": grids,
        "tag": args.tag,
        "launcher": args.launcher,
        "extra_args": extra,
        "created": (previous or {}).get("created", now),
        "updated": now,
        "runs": [{**asdict(r), "setting": setting_name(r.values, grids)} for r in runs],
    }
    write_sweep(sweep_dir, info)
    again = "re-run this command" + ("" if args.name else f" with --name {name}")

    if args.launcher == "slurm":
        try:
            job_ids = launch_slurm(todo, sweep_dir, params)
        except RuntimeError as e:
            print(f"lightning-rlm sweep: error: {e}", file=sys.stderr)
            return 2
        info["slurm"] = {"parameters": params, "job_ids": job_ids}
        write_sweep(sweep_dir, info)
        print(f"submitted {len(job_ids)} runs as a SLURM job array ({job_ids[0] if job_ids else '-'}); "
              f"{again} to resume unfinished ones, then: lightning-rlm report {sweep_dir}")
        return 0

    failed = launch_local(todo, args.jobs)
    if _stop.is_set():
        print(f"sweep stopped by a signal: unfinished runs keep their last.ckpt ({again} to resume them)")
        return STOPPED_EXIT_CODE
    if failed:
        print(f"{len(failed)} of {len(todo)} runs failed: {', '.join(failed)} ({again} to resume them)")
        return 1
    print(f"all {len(runs)} runs done; next: lightning-rlm report {sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
