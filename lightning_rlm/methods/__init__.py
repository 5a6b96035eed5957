"""One LightningModule per method."""

from lightning_rlm.methods.gradient_routing import GradientRouting
from lightning_rlm.methods.grpo import GRPO
from lightning_rlm.methods.language_model import LanguageModel
from lightning_rlm.methods.quiet_star_gru import QuietStarGRU
from lightning_rlm.methods.sft_kl_barrier import SFTKLBarrier

__all__ = ["GRPO", "GradientRouting", "LanguageModel", "QuietStarGRU", "SFTKLBarrier"]
from lightning_rlm.methods.projected_grpo import ProjectedGRPO  # noqa: E402

__all__ += ["ProjectedGRPO"]
from lightning_rlm.methods.gan_rl import GANRL  # noqa: E402

__all__ += ["GANRL"]
from lightning_rlm.methods.quiet_star import QuietStar  # noqa: E402

__all__ += ["QuietStar"]
