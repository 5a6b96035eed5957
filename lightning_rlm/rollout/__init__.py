"""Rollout sampling and completion scoring shared by the RL objectives (GRPO, gradient routing, GAN-RL),
and the text rollout that methods hand to the evaluation callbacks."""

from lightning_rlm.rollout import generate as _generate
from lightning_rlm.rollout.generate import *  # noqa: F403  (the names of generate.__all__)
from lightning_rlm.rollout.text import TextRollout

__all__ = [*_generate.__all__, "TextRollout"]
