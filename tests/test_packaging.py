"""What a user building or installing the project gets: a LICENSE matching pyproject's, a Dockerfile that caches
its dependency layer, runs as a user and bakes in no offline switch, and CI that keeps out of the user's .venv."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_license_file_matches_pyproject():
    license_id = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert license_id == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_dockerfile_installs_dependencies_before_the_source_and_runs_as_a_user():
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    first_source_copy = next(i for i, ln in enumerate(lines) if ln.startswith("COPY lightning_rlm"))
    torch_install = next(i for i, ln in enumerate(lines) if "pip install torch==" in ln)
    assert torch_install < first_source_copy
    assert "ARG TORCH_VARIANT=cpu" in lines  # a CPU image unless asked for another
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] != "USER root"
    assert not any("HF_HUB_OFFLINE" in ln for ln in lines)


def test_ci_uses_its_own_environment_folder():
    run = (ROOT / ".ci" / "run").read_text()
    assert "rm -rf .venv" not in run and "python3 -m venv .ci-venv" in run
    assert ".ci-venv/" in (ROOT / ".gitignore").read_text()
