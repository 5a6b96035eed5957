"""Small helpers for what every method logs besides scalars."""

from __future__ import annotations

from typing import Optional

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


def log_text(module: L.LightningModule, tag: str, text: str, step: Optional[int] = None) -> None:
    """Markdown `text` to the TensorBoard text tab of every TensorBoard logger of `module` (call on rank 0)."""
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, text, module.global_step if step is None else step)
