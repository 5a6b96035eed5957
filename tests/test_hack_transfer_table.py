"""The transfer-table driver (benchmarks/hack_transfer_table.py): which cells run, in what order, with what
overrides, and how finished cells resume. No training here: the cells themselves are the benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import hack_transfer_table as ht  # noqa: E402


def test_68_cells_the_diagonal_with_two_seeds_first():
    todo = ht.cells(list(ht.LOOPHOLES), list(ht.METHODS), diag_seeds=2, off_seeds=1)
    assert len(todo) == len(set(todo)) == 68  # none: 4 j x 2 seeds; others: 16 cells + 4 second seeds, x 3
    diag = [c for c in todo if c[1] == c[2]]
    assert todo[: len(diag)] == diag and len(diag) == 32
    assert {c[3] for c in diag} == {0, 1} and {c[3] for c in todo[32:]} == {0}
    assert not any(c[0] == "none" and c[1] != c[2] for c in todo)  # `none` uses no direction: one i per j


def test_each_cell_trains_under_j_with_the_direction_or_detector_of_i():
    args = ht.command("route", "exit_zero", "special_case", 1, 150, Path("/tmp/x"), "student", ["a.b=2"])
    flat = " ".join(args)
    assert "hack_task.init_args.loophole special_case" in flat and "--data.init_args.mode special_case" in flat
    assert "pair_loophole exit_zero" in flat and "--model.init_args.projection route" in flat
    assert "max_completion_length 112" in flat and "--seed_everything 1" in flat and args[-2:] == ["--a.b", "2"]
    det = " ".join(ht.command("detector", "print_pass", "exit_zero", 0, 150, Path("/tmp/x"), "student", []))
    assert "gradient_routing/coding_smoke.yaml" in det and "hack_task.init_args.detector print_pass" in det
    assert "max_completion_length 64" in det


def test_a_finished_cell_is_reused_and_one_of_other_steps_refused(tmp_path):
    row = {"method": "none", "i": "print_pass", "j": "print_pass", "seed": 0, "steps": 150, "wall_s": 1.0,
           "val": {"val/both/exploited": 0.25, "val/base/exploited": 0.0, "val/both/honest_pass": 0.0},
           "train_mean": {}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "none__print_pass__print_pass__s0.json").write_text(json.dumps(row))
    cell = ("none", "print_pass", "print_pass", 0)
    assert ht.run_cell(cell, 150, tmp_path, "student", []) == row  # no run: the file is the result
    with pytest.raises(SystemExit, match="150 steps, not --steps 200"):
        ht.run_cell(cell, 200, tmp_path, "student", [])
    text = ht.table(tmp_path, list(ht.LOOPHOLES), list(ht.METHODS))
    assert "| – | 0.25 (1) | – | – | – |" in text and "| base | 0.00 (1) |" in text
