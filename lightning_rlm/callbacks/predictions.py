"""Write what `lightning-rlm predict` returns to a jsonl file in the run folder.

Each item a method's `predict_step` returns (a dict, e.g. GRPO's `{"prompt", "sample", "completion",
"rewards"}`, or a string, e.g. the LM baseline's samples, written as `{"text": ...}`) becomes one JSON line of
`<log_dir>/<filename>`, appended batch by batch as it is produced (one `os.write` per line, so a stopped run
leaves whole lines). Under DDP each rank writes its own `<stem>.rank<r>.jsonl`. The CLI adds this callback to
every run as `predictions:`; it acts only in `predict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_rlm.logging_utils import append_jsonl_line

__all__ = ["PredictionsWriter"]


class PredictionsWriter(BasePredictionWriter):
    """Append each predicted item to `<log_dir>/<filename>` (see the module docstring).

    Args:
        filename: the jsonl file name in the run folder.
        output_dir: write there instead of the run folder.
    """

    def __init__(self, filename: str = "predictions.jsonl", output_dir: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        if not filename.endswith(".jsonl"):
            raise ValueError(f"predictions.filename must end with .jsonl, got {filename!r}")
        self.filename = filename
        self.output_dir = output_dir
        self.path: Optional[Path] = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = self.filename if trainer.world_size == 1 else self.filename.replace(
            ".jsonl", f".rank{trainer.global_rank}.jsonl")
        self.path = folder / name
        if self.path.exists():  # never append to (or overwrite) an earlier prediction run's file
            stem, n = self.path.stem, 1
            while (folder / f"{stem}-{n}.jsonl").exists():
                n += 1
            self.path = folder / f"{stem}-{n}.jsonl"

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        assert self.path is not None
        for item in prediction if isinstance(prediction, list) else [prediction]:
            append_jsonl_line(self.path, item if isinstance(item, dict) else {"text": str(item)})
