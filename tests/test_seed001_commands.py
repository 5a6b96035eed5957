"""Seed 001's command lines as our commands (docs/seed001_commands.md): well formed, the notebook's run counts, runnable.

The doc has one table row per `python run.py` line of the seed 001 notebook: its line number, the notebook's
command, its number of runs (the product of its hydra multirun lists), our `lightning-rlm fit` or
`lightning-rlm sweep` command (in backticks; none for a line left out) and notes.

Fast (no training, in this process):
- the rows follow the notebook: one per command line, in order, with its run count (skipped when the notebook,
  `$SEED001_NOTEBOOK` or `shared/seeds/001_*.txt` beside or inside the repository, is not readable);
- each sweep's own dry run (`lightning-rlm sweep ... --dry-run`) plans that many runs, and a `fit` is one;
- the first and the last run of each row parse (every option name and value type), with the CLI's parser built
  once.
Slow: the first run of a command trains with `--trainer.fast_dev_run=true` on tiny batches of short windows, in a
subprocess of one thread as a user would run it (two at a time: `run_pool` in tests/conftest.py): by default the rows that cover every config and every option name of the table
at least once (`covering`, 35 of the 147 distinct commands, to keep CI's slow suite short); with
`LRLM_SEED001_ALL=1` every distinct command (seeds aside).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

from lightning_rlm.data.paths import find_data_path
from lightning_rlm.workflow import sweep

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "seed001_commands.md"
NOTEBOOK_NAME = "001_300ea45f2d2dc8d4.txt"
FINEWEB_FILE = "fineweb-edu/fineweb_edu_sample10BT_head_heuristic_split.jsonl"
# what makes a run tiny (fast_dev_run: one training and one validation batch)
TINY = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=2", "--data.init_args.block_size=32"]


class Row(NamedTuple):
    line: int  # the notebook's line number
    runs: int  # the notebook's number of runs
    argv: Optional[list[str]]  # our command after `lightning-rlm`; None: left out
    notes: str


def doc_rows() -> list[Row]:
    """The rows of the doc's table (lines starting with `| <number> |`)."""
    rows = []
    for text in DOC.read_text().splitlines():
        if not re.match(r"\| \d+ \|", text):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", text)[1:-1]]
        line, _, runs, ours, notes = cells
        commands = re.findall(r"`([^`]+)`", ours)
        assert len(commands) <= 1, f"line {line}: one command per row, got {commands}"
        argv = shlex.split(commands[0]) if commands else None
        if argv is not None:
            assert argv[0] == "lightning-rlm" and argv[1] in ("fit", "sweep"), commands[0]
            argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv[1:]]
        rows.append(Row(int(line), int(runs), argv, notes))
    return rows


ROWS = doc_rows()
COMMAND_ROWS = [r for r in ROWS if r.argv is not None]


def notebook_path() -> Optional[Path]:
    candidates = [os.environ.get("SEED001_NOTEBOOK", ""), ROOT / "shared" / "seeds" / NOTEBOOK_NAME,
                  ROOT.parent / "shared" / "seeds" / NOTEBOOK_NAME]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def notebook_runs(text: str) -> int:
    """Runs of one notebook line: the product of its multirun lists (1 without `-m`)."""
    cmd = text[text.index("python run.py"):]
    cmd = re.sub(r"\s*-->\s*$", "", re.sub(r"\s+//.*$", "", cmd))  # a trailing comment, an HTML comment's end
    tokens = shlex.split(cmd.replace("-m+", "-m +"))[2:]
    if "-m" not in tokens:
        return 1
    runs = 1
    for token in tokens:
        key, _, values = token.partition("=")
        if key not in ("-m", "+run_modifier"):
            runs *= len(sweep.split_values(values))
    return runs


def planned_fits(row: Row, tmp_path: Path) -> list[list[str]]:
    """The `fit` command of every run of the row (a sweep's own `--dry-run`), after `lightning_rlm`."""
    if row.argv[0] == "fit":
        return [row.argv]
    args = row.argv[1:]
    cut = args.index("--") if "--" in args else len(args)  # sweep options go before the runs' `--` arguments
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = sweep.main([*args[:cut], "--dry-run", "--out", str(tmp_path / "sweeps"), *args[cut:]])
    assert code == 0 and "dry run: nothing launched" in out.getvalue(), out.getvalue()[-2000:]
    fits = [shlex.split(line.strip()) for line in out.getvalue().splitlines() if " -m lightning_rlm fit " in line]
    return [fit[fit.index("lightning_rlm") + 1:] for fit in fits]


class _Parser(Exception):
    """Carries the CLI's parser out of `RLMCLI` before it parses anything."""


@functools.cache
def cli_parser():
    """The `lightning-rlm` parser, built once (building it is most of a `--print_config`'s time)."""
    from lightning_rlm.cli import RLMCLI

    class ParserOnly(RLMCLI):
        def parse_arguments(self, parser, args):
            raise _Parser(parser)

    with pytest.raises(_Parser) as built:
        ParserOnly(args=["fit"])
    return built.value.args[0]


def parse(argv: list[str]) -> tuple[int, str]:
    """Parse `lightning-rlm <argv>` as the CLI does before it builds anything: (exit code, its messages)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            cli_parser().parse_args(argv)
        except SystemExit as e:
            return (e.code if isinstance(e.code, int) else 1), out.getvalue()
    return 0, out.getvalue()


def test_the_table_follows_the_notebook():
    """One row per command line of the notebook, in its order, with its run count; the left-out rows say why."""
    assert ROWS and [r.line for r in ROWS] == sorted({r.line for r in ROWS})
    assert all(r.argv is not None or r.notes.startswith("left out:") for r in ROWS)
    path = notebook_path()
    if path is None:
        pytest.skip(f"the seed 001 notebook ({NOTEBOOK_NAME}) is not readable here; set SEED001_NOTEBOOK")
    lines = path.read_text().splitlines()
    expected = {no: notebook_runs(text) for no, text in enumerate(lines, 1) if "python run.py" in text}
    assert {r.line: r.runs for r in ROWS} == expected


@pytest.mark.parametrize("row", COMMAND_ROWS, ids=lambda r: f"L{r.line}")
def test_command_is_well_formed(row, tmp_path):
    """The sweep plans the notebook's number of runs; its first and last run parse (option names and types)."""
    fits = planned_fits(row, tmp_path)
    assert len(fits) == row.runs
    for fit in {0: fits[0], len(fits) - 1: fits[-1]}.values():
        code, text = parse(fit)
        assert code == 0, f"{shlex.join(fit)}\n{text[-2000:]}"


def distinct_first_runs() -> dict[str, Row]:
    """The rows whose first run differs from every earlier row's in more than its seed and run folders."""
    seen: dict[str, Row] = {}
    for row in COMMAND_ROWS:
        argv = sorted(a for a in row.argv
                      if not a.startswith(("--seed_everything=", "seed_everything=", "--name", "seed001_l")))
        seen.setdefault(" ".join(argv), row)
    return {f"L{row.line}": row for row in seen.values()}


def covering(rows: dict[str, Row]) -> dict[str, Row]:
    """The rows, in order, that each bring a config, a command (fit / sweep) or an option name not seen in an
    earlier picked row: together they run every config and every option of the table once."""
    seen: set[str] = set()
    picked = {}
    for name, row in rows.items():
        argv = row.argv
        features = {f"config {argv[argv.index('--config') + 1]}", f"command {argv[0]}"}
        features |= {m.group(2) for a in argv if (m := re.match(r"(--)?([\w.]+)=", a))} - {"seed_everything"}
        if features - seen:
            picked[name] = row
            seen |= features
    return picked


FIRST_RUNS = distinct_first_runs()
SMOKE_RUNS = FIRST_RUNS if os.environ.get("LRLM_SEED001_ALL") == "1" else covering(FIRST_RUNS)


def first_runnable(row: Row, folder: Path) -> tuple[Optional[list[str]], list[str]]:
    """The row's first run whose checkpoints exist in `folder` (None if none does), and every checkpoint it names."""
    fits = planned_fits(row, folder)
    ckpts = [[a.split("=", 1)[1] for a in fit if re.match(r"--model\.init_args\.pretrained_\w+=", a)] for fit in fits]
    runnable = [fit for fit, paths in zip(fits, ckpts) if all(p == "null" or (folder / p).is_file() for p in paths)]
    return (runnable[0] if runnable else None), sorted(set(sum(ckpts, [])))


def smoke_run(fit: list[str], folder: Path) -> subprocess.CompletedProcess:
    """`lightning-rlm <fit> <TINY>` in a fresh process of one thread, in `folder`."""
    return subprocess.run([sys.executable, "-m", "lightning_rlm", *fit, *TINY], cwd=folder,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke_runs(selected_params, tmp_path_factory, run_pool) -> dict:
    """{name: (its first runnable fit or None, the checkpoints it names, its run's future or None)} for the rows this
    session runs, started in the tests' order (`run_pool`); a run whose sample is missing is not started."""
    runs = {}
    for name in selected_params("test_command_runs", "name"):
        folder = tmp_path_factory.mktemp(f"seed001_{name}")
        fit, ckpts = first_runnable(SMOKE_RUNS[name], folder)
        ready = fit is not None and not (any("fineweb" in a for a in fit) and find_data_path(FINEWEB_FILE) is None)
        runs[name] = (fit, ckpts, run_pool.submit(smoke_run, fit, folder) if ready else None)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOKE_RUNS))
def test_command_runs(name, need_data, smoke_runs):
    """The first run of the row (the first whose checkpoints exist) trains a fast_dev_run on tiny batches."""
    fit, ckpts, future = smoke_runs[name]
    if fit is None:
        pytest.skip(f"needs a checkpoint another command makes: {ckpts} (see the row's notes)")
    if any("fineweb" in a for a in fit):
        need_data(FINEWEB_FILE)
    run = future.result()
    assert run.returncode == 0, f"{shlex.join(fit)}\n{run.stderr[-3000:]}"
