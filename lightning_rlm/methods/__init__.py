"""One LightningModule per method."""

from lightning_rlm.methods.grpo import GRPO
from lightning_rlm.methods.language_model import LanguageModel

__all__ = ["GRPO", "LanguageModel"]
