"""One LightningModule per method."""

from lightning_rlm.methods.language_model import LanguageModel

__all__ = ["LanguageModel"]
