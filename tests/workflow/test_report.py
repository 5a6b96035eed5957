"""`lightning-rlm report`: tables across seeds from event files, and a real 2×2 sweep end to end."""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from lightning_rlm.workflow import report, sweep

ROOT = Path(__file__).resolve().parents[2]
GRU = str(ROOT / "configs/lm/gru_shakespeare.yaml")
HIDDEN = "model.init_args.network.init_args.hidden_size"
TINY = [  # a few CPU steps of a tiny GRU, validation at the last one
    "--model.init_args.network.init_args.embed_dim=16", "--model.init_args.network.init_args.num_layers=1",
    "--data.init_args.block_size=16", "--data.init_args.batch_size=8", "--trainer.accelerator=cpu",
    "--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--model.init_args.sample_every_n_steps=0",
    "--model.init_args.sample_tokens=8",
]


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row["setting"]: row for row in csv.DictReader(f)}


def write_run(folder: Path, curves: dict[str, list[float]], t0: float, suffix: str = "", first_step: int = 0):
    """Event file with `curves[tag][i]` at step first_step + i, wall time t0 + 10 s per step."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder / "tb"), filename_suffix=suffix)
    for tag, values in curves.items():
        for i, v in enumerate(values):
            step = first_step + i
            writer.add_scalar(tag, v, step, walltime=t0 + 10 * step)
    writer.close()


def test_report_on_plain_folders(tmp_path, capsys):
    t0 = time.time() + 100  # scalars 100 s after the files' first event
    write_run(tmp_path / "lr=1,seed=1", {"loss": [2.0, 1.5, 1.0, 0.6, 0.4], "reward": [0.1, 0.3, 0.5, 0.7, 0.9]}, t0)
    write_run(tmp_path / "lr=1,seed=2", {"loss": [2.0, 1.8, 1.2, 0.9, 0.8], "reward": [0.0, 0.2, 0.4, 0.5, 0.6]}, t0)
    write_run(tmp_path / "lr=2,seed=1", {"loss": [2.0, 1.0, 0.5, 0.3, 0.2]}, t0, suffix=".a")
    # resumed from step 3: the later values win
    write_run(tmp_path / "lr=2,seed=1", {"loss": [0.35, 0.25]}, t0 + 50, suffix=".b", first_step=3)
    write_run(tmp_path / "other", {"loss": [3.0, 2.5]}, t0)
    (tmp_path / "notes").mkdir()  # no events: not a run

    out = tmp_path / "rep"
    assert report.main([str(tmp_path), "--metric", "loss", "--metric", "reward", "--threshold", "loss=0.5",
                        "--threshold", "reward>=0.5", "--out", str(out), "--plot"]) == 0
    rows = read_csv(out / "report.csv")
    assert list(rows) == ["lr=1", "lr=2", "other"]
    assert [rows[s]["n"] for s in rows] == ["2", "1", "1"]
    assert float(rows["lr=1"]["loss mean"]) == pytest.approx(0.6)
    assert float(rows["lr=1"]["loss std"]) == pytest.approx(statistics.stdev([0.4, 0.8]))
    assert float(rows["lr=2"]["loss mean"]) == pytest.approx(0.25)
    assert float(rows["lr=1"]["reward mean"]) == pytest.approx(0.75) and rows["lr=2"]["reward n"] == "0"
    # loss=0.5 falls (loss goes down): seed 1 at step 4, seed 2 never; lr=2 at step 2
    assert rows["lr=1"]["step to loss=0.5"] == "4.0" and rows["lr=1"]["reached loss=0.5"] == "1"
    assert rows["lr=2"]["step to loss=0.5"] == "2.0" and rows["other"]["reached loss=0.5"] == "0"
    assert float(rows["lr=1"]["step to reward>=0.5"]) == 2.5  # steps 2 and 3
    assert float(rows["lr=1"]["seconds to reward>=0.5"]) == pytest.approx(125, abs=2)  # 100 s + 2.5 steps

    md = (out / "report.md").read_text()
    assert md == capsys.readouterr().out.split("wrote ")[0].rstrip("\n") + "\n"
    assert "| lr=1 | 2 | 0.6 ± 0.28 | 0.75 ± 0.21 | 4 (1/2) |" in md
    assert "| lr=2 | 1 | 0.25 | n/a | 2 |" in md
    assert "| other | 1 | 2.5 | n/a | n/a | n/a | n/a | n/a |" in md
    assert (out / "curves_loss.png").stat().st_size > 1000 and (out / "curves_reward.png").exists()


def test_report_errors(tmp_path, capsys):
    from lightning_rlm.main import main as cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(["report", str(tmp_path / "nope")])
    assert exc.value.code == 2 and "is not a folder" in capsys.readouterr().err
    write_run(tmp_path / "a", {"loss": [1.0]}, time.time())
    for args, msg in [(["--threshold", "loss~1"], "bad --threshold 'loss~1'"),
                      (["--threshold", "loss=abc"], "bad --threshold 'loss=abc'"),
                      (["--metric", "val/los"], "no run logged 'val/los'; logged tags: loss")]:
        with pytest.raises(SystemExit):
            cli_main(["report", str(tmp_path), *args])
        assert msg in capsys.readouterr().err


def last_value(run_dir: Path, tag: str) -> float:
    """Independent of report.py: the value at the highest step in the run's event file."""
    (events,) = run_dir.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={SCALARS: 0}).Reload()
    return max(acc.Scalars(tag), key=lambda e: (e.step, e.wall_time)).value


def test_tiny_gru_sweep_end_to_end(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the runs
    monkeypatch.chdir(tmp_path)
    args = ["--config", GRU, "--grid", f"{HIDDEN}=16,24", "--grid", "seed_everything=1,2", "--tag", "tiny",
            "--out", str(tmp_path), "--name", "s", "--jobs", "2", "--", *TINY]
    assert sweep.main(args) == 0
    sdir = tmp_path / "s"
    names = ["hidden_size=16,seed=1", "hidden_size=16,seed=2", "hidden_size=24,seed=1", "hidden_size=24,seed=2"]
    for name in names:
        assert (sdir / name / "DONE").exists(), (sdir / name / "log.txt").read_text()[-3000:]
        assert (sdir / name / "checkpoints" / "last.ckpt").exists()

    assert report.main([str(sdir), "--metric", "val/loss", "--metric", "train/loss", "--plot"]) == 0
    rows = read_csv(sdir / "report.csv")
    assert list(rows) == ["hidden_size=16", "hidden_size=24"]
    for setting, row in rows.items():
        assert row["n"] == "2"
        for tag in ("val/loss", "train/loss"):
            finals = [last_value(sdir / n, tag) for n in names if n.startswith(setting + ",")]
            assert float(row[f"{tag} mean"]) == pytest.approx(statistics.fmean(finals), rel=1e-9)
            assert float(row[f"{tag} std"]) == pytest.approx(statistics.stdev(finals), rel=1e-6)
    assert "# s: tiny" in (sdir / "report.md").read_text()
    assert (sdir / "curves_val_loss.png").exists()

    # restart: one run lost its DONE but kept its checkpoint → only it runs again, from last.ckpt
    (sdir / names[3] / "DONE").unlink()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for n in names[:3] for p in (sdir / n).rglob("*")
              if p.is_file()}
    calls: list[list[str]] = []

    def record(cmd: list[str], run_dir: str) -> int:
        calls.append(cmd)
        return 0

    monkeypatch.setattr(sweep, "run_one", record)
    assert sweep.main(args) == 0
    (cmd,) = calls
    assert f"--trainer.logger.init_args.save_dir={sdir / names[3]}" in cmd
    assert cmd[-2:] == ["--ckpt_path", str(sdir / names[3] / "checkpoints" / "last.ckpt")]
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for n in names[:3] for p in (sdir / n).rglob("*")
             if p.is_file()}
    assert after == before


def test_a_csv_logged_run_gets_text_logs_and_a_report(tmp_path, tiny_llama_dir, capsys):
    """Any Lightning logger: a CSVLogger run keeps its scalars (metrics.csv), its text (text.jsonl) and its
    completions, and `report` reads the CSV."""
    import json

    from lightning_rlm.cli import RLMCLI

    configs = Path(__file__).resolve().parents[2] / "configs"
    runs = tmp_path / "csv_runs"
    for seed in (1, 2):
        RLMCLI(args=["fit", "--config", str(configs / "grpo/sentence_length_10_smooth.yaml"),
                     "--model.init_args.model_name_or_path", str(tiny_llama_dir), "--data.init_args.tokenizer",
                     str(tiny_llama_dir), "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                     f"--trainer.logger.save_dir={runs}", f"--trainer.logger.name=seed={seed}",
                     f"--seed_everything={seed}", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                     "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
                     "--model.init_args.num_generations=2", "--model.init_args.max_completion_length=6",
                     "--model.init_args.eval_samples=2", "--trainer.enable_progress_bar=false"])
        run = runs / f"seed={seed}" / "version_0"
        assert "train/reward" in (run / "metrics.csv").read_text().splitlines()[0].split(",")
        texts = [json.loads(line) for line in (run / "text.jsonl").read_text().splitlines()]
        assert any(t["tag"] == "val/fixed_prompt_samples" and "| # |" in t["text"] for t in texts)
        assert (run / "completions.jsonl").is_file()
    assert report.main([str(runs), "--metric", "train/reward"]) == 0
    out = capsys.readouterr().out
    assert "train/reward" in out and "| 2 |" in out.replace(" 2 |", "| 2 |") or "2" in out
