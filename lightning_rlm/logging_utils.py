"""Small helpers for what every method logs besides scalars: text (through any logger), JSONL lines."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

TEXT_FILE = "text.jsonl"  # text logs of loggers without a text channel (CSVLogger)


def log_text(module: L.LightningModule, tag: str, text: str, step: Optional[int] = None) -> None:
    """Markdown `text` to every logger of `module` (call on rank 0): TensorBoard's text tab; a one-cell table
    for loggers with `log_text` (W&B); any other logger with a folder (CSV, ...) gets a line
    `{"tag", "step", "text"}` appended to `<its log_dir>/text.jsonl`."""
    step = module.global_step if step is None else step
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, text, step)
        elif hasattr(logger, "log_text"):  # e.g. WandbLogger
            logger.log_text(key=tag, columns=["text"], data=[[text]], step=step)
        elif getattr(logger, "log_dir", None):
            os.makedirs(logger.log_dir, exist_ok=True)
            append_jsonl_line(os.path.join(logger.log_dir, TEXT_FILE), {"tag": tag, "step": step, "text": text})


def append_jsonl_line(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append `record` as one JSON line with a single write to an O_APPEND descriptor."""
    data = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # regular files practically never write short; finish if they do
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)
