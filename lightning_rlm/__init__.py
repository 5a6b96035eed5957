"""lightning_rlm: train language models with RL and auxiliary objectives on PyTorch Lightning."""

__version__ = "0.1.0"
