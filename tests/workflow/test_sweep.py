"""`lightning-rlm sweep`: grids and run names, dry runs, bad grids, restarts, and the SLURM submission.

No test here trains: runs are stubbed (`run_one` patched) or trivial Python commands; the real
end-to-end sweep is in test_report.py.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from lightning_rlm.workflow import sweep
from lightning_rlm.workflow.sweep import expand_grid, parse_grid, plan_sweep, short_keys

ROOT = Path(__file__).resolve().parents[2]
GRU = str(ROOT / "configs/lm/gru_shakespeare.yaml")
HIDDEN = "model.init_args.network.init_args.hidden_size"


def test_parse_grid_splits_values_outside_brackets():
    assert parse_grid("model.init_args.beta=0.003,0.01,0.02") == ("model.init_args.beta", ["0.003", "0.01", "0.02"])
    assert parse_grid("data.x=[1,2],[3, 4],'a,b'") == ("data.x", ["[1,2]", "[3, 4]", "'a,b'"])
    assert parse_grid("seed_everything=7") == ("seed_everything", ["7"])


def test_grid_expansion_and_run_names():
    grids = {"model.init_args.beta": ["0.003", "0.01"], "trainer.max_steps": ["5"], "seed_everything": ["42", "123"]}
    assert expand_grid(grids)[:2] == [
        {"model.init_args.beta": "0.003", "trainer.max_steps": "5", "seed_everything": "42"},
        {"model.init_args.beta": "0.003", "trainer.max_steps": "5", "seed_everything": "123"},
    ]
    runs = plan_sweep(grids)
    # only the varied keys name a run; the first grid varies slowest
    assert [r.name for r in runs] == ["beta=0.003,seed=42", "beta=0.003,seed=123", "beta=0.01,seed=42",
                                      "beta=0.01,seed=123"]
    assert runs[0].overrides == ["--model.init_args.beta=0.003", "--trainer.max_steps=5", "--seed_everything=42"]


def test_run_names_are_short_safe_and_unique():
    # colliding last components get one more component (init_args dropped)
    assert short_keys(["model.init_args.lr", "data.init_args.lr", "seed_everything"]) == {
        "model.init_args.lr": "model.lr", "data.init_args.lr": "data.lr", "seed_everything": "seed"}
    runs = plan_sweep({"data.init_args.source.path": ["texts/a b.txt", "other/a b.txt", "x?"]})
    names = [r.name for r in runs]
    assert names[0] == "path=a_b.txt" and names[2] == "path=x"
    assert names[1].startswith("path=a_b.txt-") and len(set(names)) == 3  # a digest keeps them apart
    assert all("/" not in n and " " not in n for n in names)
    long = plan_sweep({"model.x": ["a" * 300, "b" * 300]})
    assert all(len(r.name) <= 60 for r in long)


@pytest.mark.parametrize("spec", ["model.init_args.lr", "=1,2", "model.init_args.lr=", "model.init_args.lr=1,,2",
                                  "model lr=1", "model.init_args.lr=[1e-3,2e-3", "model.init_args.lr=1e-3]",
                                  "model.init_args.name='a,b"])
def test_bad_grid_is_one_clear_error(spec, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--config", GRU, "--grid", spec, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"lightning-rlm sweep: error: bad --grid {spec!r}")
    assert not any(tmp_path.iterdir())


def test_same_key_twice_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--config", GRU, "--grid", "seed_everything=1", "--grid", "seed_everything=2",
                    "--out", str(tmp_path)])
    assert "already swept" in capsys.readouterr().err


def test_dry_run_prints_runs_and_commands(tmp_path, capsys):
    code = sweep.main(["--config", GRU, "--grid", f"{HIDDEN}=16,32", "--grid", "seed_everything=1,2",
                       "--out", str(tmp_path), "--name", "s", "--dry-run", "--", "--trainer.max_steps=3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "4 runs" in out and "dry run: nothing launched" in out
    run_dir = tmp_path / "s" / "hidden_size=32,seed=2"
    cmd_line = next(line for line in out.splitlines() if f"{HIDDEN}=32 --seed_everything=2" in line)
    for part in ["-m lightning_rlm fit --config", GRU, "--trainer.max_steps=3",
                 f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.logger.init_args.name=tb",
                 "--trainer.logger.init_args.version=0", f"--checkpoint.dirpath={run_dir}/checkpoints"]:
        assert part in cmd_line, part
    assert "--ckpt_path" not in out
    assert out.count("[new] ") == 4
    assert not (tmp_path / "s").exists()  # nothing written


def _fake_run(calls: list[list[str]], fail: tuple[str, ...] = ()):
    """A stand-in for `run_one` that writes what a finished run leaves behind."""

    def run_one(cmd: list[str], run_dir: str) -> int:
        calls.append(cmd)
        folder = Path(run_dir)
        (folder / "tb" / "version_0").mkdir(parents=True, exist_ok=True)
        (folder / "tb" / "version_0" / f"events.out.tfevents.{len(calls)}").write_text("events")
        (folder / "checkpoints").mkdir(exist_ok=True)
        (folder / "checkpoints" / "last.ckpt").write_text("ckpt")
        (folder / "log.txt").write_text(" ".join(cmd))
        if folder.name in fail and "--ckpt_path" not in cmd:  # fails once, then resumes fine
            return 1
        (folder / "DONE").write_text("")
        return 0

    return run_one


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*")
            if p.is_file()}


def test_restart_skips_done_runs_and_resumes_unfinished(tmp_path, monkeypatch, capsys):
    calls: list[list[str]] = []
    monkeypatch.setattr(sweep, "run_one", _fake_run(calls, fail=("hidden_size=32,seed=1",)))
    args = ["--config", GRU, "--grid", f"{HIDDEN}=16,32", "--grid", "seed_everything=1,2", "--tag", "t",
            "--out", str(tmp_path), "--name", "s", "--jobs", "2"]
    assert sweep.main(args) == 1  # one run failed
    assert len(calls) == 4 and not any("--ckpt_path" in c for c in calls)
    sdir = tmp_path / "s"
    info = json.loads((sdir / "sweep.json").read_text())
    assert info["config"] == GRU and info["tag"] == "t" and info["launcher"] == "local"
    assert info["grids"] == {HIDDEN: ["16", "32"], "seed_everything": ["1", "2"]}
    assert [r["name"] for r in info["runs"]] == ["hidden_size=16,seed=1", "hidden_size=16,seed=2",
                                                "hidden_size=32,seed=1", "hidden_size=32,seed=2"]
    assert info["runs"][0]["overrides"] == [f"--{HIDDEN}=16", "--seed_everything=1"]
    assert info["runs"][0]["setting"] == "hidden_size=16"

    (sdir / "hidden_size=16,seed=2" / "DONE").unlink()  # crashed after its last checkpoint
    done = ["hidden_size=16,seed=1", "hidden_size=32,seed=2"]
    before = {name: _snapshot(sdir / name) for name in done}
    calls.clear()
    capsys.readouterr()
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "[done] hidden_size=16,seed=1" in out and "[resume] hidden_size=16,seed=2" in out
    assert len(calls) == 2  # the two unfinished runs, nothing else
    for name in ("hidden_size=16,seed=2", "hidden_size=32,seed=1"):
        cmd = next(c for c in calls if f"--trainer.logger.init_args.save_dir={sdir / name}" in c)
        assert cmd[-2:] == ["--ckpt_path", str(sdir / name / "checkpoints" / "last.ckpt")]
    assert {name: _snapshot(sdir / name) for name in done} == before  # finished runs untouched
    assert all((sdir / r["name"] / "DONE").exists() for r in info["runs"])

    calls.clear()
    assert sweep.main(args) == 0 and calls == []  # everything done: nothing launched
    with pytest.raises(SystemExit):  # same folder, other grids: refused
        sweep.main([*args[:4], f"{HIDDEN}=64", *args[4:]])


def test_run_one_logs_marks_done_and_resumes(tmp_path):
    ok = tmp_path / "ok"
    assert sweep.run_one([sys.executable, "-c", "import sys; print('args', sys.argv[1:])"], str(ok)) == 0
    assert (ok / "DONE").exists() and "args []" in (ok / "log.txt").read_text()

    bad = tmp_path / "bad"
    (bad / "checkpoints").mkdir(parents=True)
    (bad / "checkpoints" / "last.ckpt").write_text("")
    assert sweep.run_one([sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(3)"], str(bad)) == 3
    log = (bad / "log.txt").read_text()
    assert not (bad / "DONE").exists() and "exit code 3" in log
    assert f"['--ckpt_path', '{bad / 'checkpoints' / 'last.ckpt'}']" in log  # found at run time


class _FakeJob:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id


class _FakeExecutor:
    """Records what submitit's AutoExecutor would be asked; submits nothing."""

    instances: list[_FakeExecutor] = []

    def __init__(self, folder: str, cluster: str | None = None, **kwargs) -> None:
        self.folder, self.cluster, self.params, self.arrays = folder, cluster, {}, []
        _FakeExecutor.instances.append(self)

    def update_parameters(self, **params) -> None:
        self.params.update(params)

    def map_array(self, fn, *iterables):
        self.arrays.append((fn, [list(it) for it in iterables]))
        return [_FakeJob(f"777_{i}") for i in range(len(iterables[0]))]


def test_slurm_launcher_submits_one_array_job_per_run(tmp_path, monkeypatch, capsys):
    _FakeExecutor.instances.clear()
    monkeypatch.setitem(sys.modules, "submitit", types.SimpleNamespace(AutoExecutor=_FakeExecutor))
    code = sweep.main(["--config", GRU, "--grid", f"{HIDDEN}=16,32", "--grid", "seed_everything=1,2,3",
                       "--out", str(tmp_path), "--name", "s", "--launcher", "slurm", "--partition", "gpu",
                       "--time-min", "90", "--gpus", "2", "--array-parallelism", "3",
                       "--slurm-param", "mem_gb=64", "--slurm-param", "slurm_account=rl"])
    assert code == 0
    (ex,) = _FakeExecutor.instances
    sdir = tmp_path / "s"
    assert Path(ex.folder).parent == sdir / "slurm" and ex.cluster == "slurm"
    assert ex.params == {"name": "s", "slurm_partition": "gpu", "timeout_min": 90, "gpus_per_node": 2,
                         "tasks_per_node": 2, "slurm_array_parallelism": 3, "mem_gb": 64, "slurm_account": "rl"}
    ((fn, (cmds, folders)),) = ex.arrays  # one array
    assert fn is sweep.run_one and len(cmds) == len(folders) == 6
    assert sorted(Path(f).name for f in folders) == sorted(r.name for r in plan_sweep(
        {HIDDEN: ["16", "32"], "seed_everything": ["1", "2", "3"]}))
    assert all(c[1:4] == ["-m", "lightning_rlm", "fit"] for c in cmds)
    info = json.loads((sdir / "sweep.json").read_text())
    assert info["launcher"] == "slurm" and info["slurm"]["job_ids"][0] == "777_0"
    assert "submitted 6 runs" in capsys.readouterr().out

    # re-submitting after two runs finished: only the other four go out
    for name in ("hidden_size=16,seed=1", "hidden_size=32,seed=3"):
        (sdir / name).mkdir(exist_ok=True)
        (sdir / name / "DONE").write_text("")
    assert sweep.main(["--config", GRU, "--grid", f"{HIDDEN}=16,32", "--grid", "seed_everything=1,2,3",
                       "--out", str(tmp_path), "--name", "s", "--launcher", "slurm"]) == 0
    assert len(_FakeExecutor.instances[-1].arrays[0][1][0]) == 4


def test_slurm_without_submitit_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` fail
    code = sweep.main(["--config", GRU, "--grid", "seed_everything=1,2", "--out", str(tmp_path),
                       "--launcher", "slurm"])
    assert code == 2
    assert "pip install submitit" in capsys.readouterr().err


def test_setting_names_stay_apart_when_values_are_shortened():
    long_a, long_b = "x" * 40 + "a", "x" * 40 + "b"  # the same first 32 characters
    grids = {"model.init_args.note": [long_a, long_b], "data.path": ["a/data.jsonl", "b/data.jsonl"],
             "seed_everything": ["1", "2"]}
    names = {sweep.setting_name({"model.init_args.note": n, "data.path": p, "seed_everything": s}, grids)
             for n in grids["model.init_args.note"] for p in grids["data.path"] for s in ("1", "2")}
    assert len(names) == 4  # 4 settings (the seed is not one), none merged
    assert all(name.startswith("note=" + "x" * 32) for name in names)
    # short values keep their plain names
    assert sweep.setting_name({"lr": "0.1", "seed": "1"}, {"lr": ["0.1", "0.2"], "seed": ["1", "2"]}) == "lr=0.1"
