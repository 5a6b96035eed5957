"""Every seed 001 experiment family in the README runs (slow): for each `lightning-rlm sweep` line of the README's
block, the sweep's own dry run prints the `fit` command of every grid point; the first and the last run with
`fast_dev_run` (so the grid's option names and values reach a real model, at its largest where the grid grows it)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADING = "### Seed 001's experiment families"


def family_commands() -> dict[str, list[str]]:
    """{sweep name: the sweep's argv after `lightning-rlm`}, from the README's bash block under HEADING."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(HEADING):]
    block = block[block.index("```bash") + len("```bash"):]
    block = block[: block.index("```")].replace("\\\n", " ")
    variables = dict(re.findall(r"\b([A-Z])=(\S+?\.yaml)", block.splitlines()[1]))
    commands = {}
    for line in block.splitlines():
        if line.startswith("lightning-rlm sweep"):
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            argv = shlex.split(line)[1:]
            commands[argv[argv.index("--name") + 1]] = argv
    return commands


FAMILIES = family_commands()


def test_the_readme_lists_the_families():
    assert {"tlm_grid", "qs_residual", "qs_layout", "gru_wg32", "gru_nll_num", "gru_policy_beta"} <= set(FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_runs(name, tmp_path):
    argv = [a.replace("configs/", f"{ROOT}/configs/", 1) if a.startswith("configs/") else a for a in FAMILIES[name]]
    dry = subprocess.run([sys.executable, "-m", "lightning_rlm", *argv, "--dry-run", "--out", str(tmp_path / "sw")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    fits = [shlex.split(line.strip()) for line in dry.stdout.splitlines() if " -m lightning_rlm fit " in line]
    assert fits, dry.stdout[-2000:]
    for fit in {0: fits[0], len(fits) - 1: fits[-1]}.values():
        run = subprocess.run([*fit, "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{shlex.join(fit)}\n{run.stderr[-3000:]}"
