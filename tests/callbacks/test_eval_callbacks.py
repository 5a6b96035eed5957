"""MauveCallback and CompletionsLogger in short Trainer runs over rollouts of real TinyStories text."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lightning_rlm.callbacks import CompletionsLogger, MauveCallback, get_rollout, per_completion, per_group
from lightning_rlm.callbacks.completions import append_jsonl_line, rollout_rows, rows_to_markdown
from lightning_rlm.metrics import MiniLMFeaturizer

N_PROMPTS, GROUP = 8, 2  # 16 completions per step


def _paragraphs(root: Path) -> list[str]:
    text = (root / "tinystories" / "tinystories_val_head.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def minilm() -> MiniLMFeaturizer:
    return MiniLMFeaturizer(num_threads=1)


class RolloutModule(LightningModule):
    """Returns a rollout of real paragraphs each step: completions, per-group references, two rewards."""

    def __init__(self, paragraphs: list[str], with_rollouts: bool = True) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.paragraphs = paragraphs
        self.with_rollouts = with_rollouts

    def _rollout(self, step: int) -> dict[str, Any]:
        n = N_PROMPTS * GROUP
        start = step * (n + N_PROMPTS)
        completions = self.paragraphs[start : start + n]
        references = self.paragraphs[start + n : start + n + N_PROMPTS]  # one per prompt
        return {
            "prompts": [f"Prompt {step}-{g} | with a pipe" for g in range(N_PROMPTS)],  # one per group
            "completions": completions,
            "references": [r for r in references for _ in range(GROUP)],  # repeated per completion
            "rewards": {"length": [float(len(c.split())) for c in completions], "nan": [math.nan] * n},
            "advantages": [float(i % 3 - 1) for i in range(n)],
            "group_size": GROUP,
        }

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, Any]:
        loss = self.layer(batch.float().view(-1, 1)).pow(2).mean()
        out: dict[str, Any] = {"loss": loss}
        if self.with_rollouts:
            out["rollout"] = self._rollout(batch_idx)
        return out

    def generate_text(self, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
        return [" ".join(p.split()[:max_new_tokens]) for p in self.paragraphs[500 : 500 + len(prompts)]]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(64), batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path: Path, callbacks: list, max_steps: int = 4) -> Trainer:
    return Trainer(
        max_steps=max_steps,
        logger=TensorBoardLogger(tmp_path),
        enable_checkpointing=False,
        accelerator="cpu",
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )


def _events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir)
    acc.Reload()
    return acc


@pytest.mark.filterwarnings("ignore:MauveCallback. scoring:UserWarning")
def test_callbacks_log_to_tensorboard_and_jsonl(
    tmp_path: Path, shared_data: Path, minilm: MiniLMFeaturizer
) -> None:
    mauve_cb = MauveCallback(every_n_steps=2, window=64, featurizer=minilm, kmeans_num_redo=1, n_seeds=2)
    comp_cb = CompletionsLogger(every_n_steps=2, max_rows=4)
    trainer = _trainer(tmp_path, [mauve_cb, comp_cb])
    trainer.fit(RolloutModule(_paragraphs(shared_data)))
    log_dir = trainer.logger.log_dir

    acc = _events(log_dir)
    scalars = acc.Tags()["scalars"]
    for name in ("mauve/mauve", "mauve/mauve_star", "mauve/frontier_integral", "mauve/mauve_std"):
        assert name in scalars, scalars
    assert [e.step for e in acc.Scalars("mauve/mauve")] == [2, 4]
    assert [e.value for e in acc.Scalars("mauve/n_model")] == [32, 64]  # window fills up
    # references come repeated per completion and are de-duplicated to one per group
    assert [e.value for e in acc.Scalars("mauve/n_reference")] == [16, 32]
    assert all(0.0 < e.value <= 1.0 for e in acc.Scalars("mauve/mauve"))
    assert "mauve/mauve" in trainer.callback_metrics

    text_tags = [t for t in acc.Tags()["tensors"] if t.startswith("completions/train")]
    assert text_tags, acc.Tags()
    table = acc.Tensors(text_tags[0])[0].tensor_proto.string_val[0].decode()
    assert "| # | prompt | completion | length | nan | advantage |" in table
    assert "with a pipe" in table and "\\|" in table  # the prompt's pipe is escaped

    lines = (Path(log_dir) / "completions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses as strict JSON
    assert [r["step"] for r in records] == [1] * 4 + [2] * 4 + [4] * 4
    first = records[0]
    assert first["stage"] == "train" and first["prompt"] == "Prompt 0-0 | with a pipe"
    assert first["rewards"]["nan"] is None and isinstance(first["rewards"]["length"], float)
    assert records[1]["group"] == 0 and records[2]["group"] == 1


def test_mauve_window_survives_checkpoint(
    tmp_path: Path, shared_data: Path, minilm: MiniLMFeaturizer
) -> None:
    cb = MauveCallback(every_n_steps=100, window=20, featurizer=minilm)
    trainer = _trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(RolloutModule(_paragraphs(shared_data)))
    assert len(cb._completions) == 20  # 2 steps x 16, capped at the window
    ckpt_path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt_path)
    state = torch.load(ckpt_path, weights_only=False)["callbacks"][cb.state_key]
    restored = MauveCallback(every_n_steps=100, window=20, featurizer=minilm)
    restored.load_state_dict(state)
    assert list(restored._completions) == list(cb._completions)
    assert list(restored._references) == list(cb._references)
    assert restored._completions.maxlen == 20 and restored._next_step == 100


@pytest.mark.filterwarnings("ignore:MauveCallback. scoring:UserWarning")
def test_mauve_generation_mode(tmp_path: Path, shared_data: Path, minilm: MiniLMFeaturizer) -> None:
    paras = _paragraphs(shared_data)
    cb = MauveCallback(
        every_n_steps=2, featurizer=minilm, prompts=["Once upon a time"] * 20, references=paras[600:620]
    )
    trainer = _trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(RolloutModule(paras, with_rollouts=False))
    acc = _events(trainer.logger.log_dir)
    assert [e.value for e in acc.Scalars("mauve/n_model")] == [20]
    assert "mauve/mauve_star" in acc.Tags()["scalars"]


def test_mauve_callback_validates_arguments() -> None:
    with pytest.raises(ValueError):
        MauveCallback(prompts=["x"])  # generation needs references
    with pytest.raises(ValueError):
        MauveCallback(featurizer="gpt2")  # type: ignore[arg-type]


def test_get_rollout_and_expansion() -> None:
    rollout = {"completions": ["a", "b", "c", "d"], "prompts": ["p", "q"], "group_size": 2}
    got = get_rollout({"loss": torch.tensor(1.0), "rollout": rollout})
    assert got is not None and got.rewards == {} and got.references is None and got.group_size == 2
    assert get_rollout(rollout) == got
    assert get_rollout(torch.tensor(1.0)) is None
    assert get_rollout(None) is None
    assert get_rollout({"loss": torch.tensor(1.0)}) is None
    assert get_rollout({"rollout": {"completions": torch.zeros(2, 3)}}) is None  # token tensors: no text
    assert per_completion(["p", "q"], 4, 2) == ["p", "p", "q", "q"]
    assert per_completion(None, 2, 1) == [None, None]
    assert per_group(["r", "r", "s", "s"], 4, 2) == ["r", "s"]
    assert per_group(["r", "s"], 4, 2) == ["r", "s"]
    with pytest.raises(ValueError):
        per_completion(["p", "q", "r"], 4, 2)


def test_rows_markdown_and_jsonl(tmp_path: Path) -> None:
    rollout = get_rollout(
        {
            "completions": ["line one\nline two", "b"],
            "prompts": ["p|q"],
            "rewards": {"r": [1.0, float("inf")]},
            "advantages": [0.5, -0.5],
            "group_size": 2,
        }
    )
    assert rollout is not None
    rows = rollout_rows(rollout, max_rows=5)
    assert [r["prompt"] for r in rows] == ["p|q", "p|q"] and rows[1]["rewards"]["r"] is None
    md = rows_to_markdown(rows)
    assert md.splitlines()[0] == "| # | prompt | completion | r | advantage |"
    assert "p\\|q" in md and "line one<br>line two" in md and "\n" not in md.splitlines()[2]
    path = tmp_path / "c.jsonl"
    for row in rows:
        append_jsonl_line(path, {"step": 3, **row})
    assert [json.loads(line)["advantage"] for line in path.read_text().splitlines()] == [0.5, -0.5]


class RankRolloutModule(RolloutModule):
    """Each rank returns different paragraphs, so gathered windows can be told apart."""

    def _rollout(self, step: int) -> dict[str, Any]:
        return super()._rollout(step * self.trainer.world_size + self.global_rank)


@pytest.mark.slow
def test_callbacks_under_ddp(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # spawned workers unpickle this module as `tests.callbacks.test_eval_callbacks`
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    cbs = [
        MauveCallback(
            every_n_steps=2, window=128, featurizer=MiniLMFeaturizer(num_threads=1), kmeans_num_redo=1
        ),
        CompletionsLogger(every_n_steps=2, max_rows=2),
    ]
    trainer = Trainer(
        max_steps=4,
        strategy="ddp_spawn",
        devices=2,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, version=0),  # fixed: the spawned ranks resolve the same dir
        enable_checkpointing=False,
        callbacks=cbs,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(RankRolloutModule(_paragraphs(shared_data)))
    acc = _events(trainer.logger.log_dir)
    # both ranks' 16 completions per step are gathered: 2 steps x 2 ranks x 16, then 4 x 2 x 16
    assert [e.value for e in acc.Scalars("mauve/n_model")] == [64, 128]
    assert [e.value for e in acc.Scalars("mauve/n_reference")] == [32, 64]
    records = [
        json.loads(x) for x in (Path(trainer.logger.log_dir) / "completions.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 1, 2, 2, 4, 4]  # rank zero only
