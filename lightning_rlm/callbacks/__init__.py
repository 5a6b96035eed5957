"""Evaluation callbacks that read the text rollouts returned by RL methods' training/validation steps.

`get_rollout(outputs)` finds the rollout dict in a step's outputs (the contract is documented in
`lightning_rlm.callbacks.rollout`); `MauveCallback` logs MAUVE of recent completions against references;
`CompletionsLogger` logs sample completions with rewards and advantages to TensorBoard and a JSONL file;
`DownstreamEvaluation` scores the method's LM on GSM8K / CommonsenseQA / jsonl tasks.
"""

from lightning_rlm.callbacks.checkpointing import RNGStates, RunCheckpoint, StopAt
from lightning_rlm.callbacks.completions import CompletionsLogger
from lightning_rlm.callbacks.downstream import DownstreamEvaluation
from lightning_rlm.callbacks.mauve import MauveCallback
from lightning_rlm.callbacks.predictions import PredictionsWriter
from lightning_rlm.callbacks.rollout import all_gather_objects, get_rollout, per_completion, per_group

__all__ = [
    "CompletionsLogger",
    "DownstreamEvaluation",
    "MauveCallback",
    "PredictionsWriter",
    "RNGStates",
    "RunCheckpoint",
    "StopAt",
    "all_gather_objects",
    "get_rollout",
    "per_completion",
    "per_group",
]
