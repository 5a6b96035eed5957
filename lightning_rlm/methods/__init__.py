"""One LightningModule per method."""

from lightning_rlm.methods.gradient_routing import GradientRouting
from lightning_rlm.methods.grpo import GRPO
from lightning_rlm.methods.language_model import LanguageModel
from lightning_rlm.methods.quiet_star_gru import QuietStarGRU
from lightning_rlm.methods.sft_kl_barrier import SFTKLBarrier

__all__ = ["GRPO", "GradientRouting", "LanguageModel", "QuietStarGRU", "SFTKLBarrier"]
