"""Small helpers for what every method logs besides scalars: TensorBoard text, JSONL lines."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


def log_text(module: L.LightningModule, tag: str, text: str, step: Optional[int] = None) -> None:
    """Markdown `text` to the TensorBoard text tab of every TensorBoard logger of `module` (call on rank 0)."""
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, text, module.global_step if step is None else step)


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
