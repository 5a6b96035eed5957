"""The `lightning-rlm` entry point: workflow commands first (no Lightning import), else LightningCLI."""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Optional

WORKFLOW = {"base-model": "lightning_rlm.workflow.base_model", "sweep": "lightning_rlm.workflow.sweep",
            "report": "lightning_rlm.workflow.report", "data": "lightning_rlm.workflow.data",
            "export": "lightning_rlm.workflow.export", "rationalize": "lightning_rlm.workflow.rationalize"}


USAGE = """usage: lightning-rlm COMMAND [options]     (lightning-rlm COMMAND --help for a command's options)

Lightning commands (LightningCLI; a method, its data and the trainer from YAML):
  fit          train:                 lightning-rlm fit --config configs/<method>/<run>.yaml [--key value ...]
  validate     validation (+ evaluation: tasks) of a checkpoint (--ckpt_path) or of the config's bare model
  test         the test loop (+ evaluation: tasks)
  predict      sample: GRPO-family completions of a prompts file, the LM baseline's samples -> predictions.jsonl

Workflow commands:
  base-model   build (or find in the cache) the tiny TinyStories Llama, lrlm:tiny-llama-tinystories
  data         list the data sets and where each file is found; `data fetch NAME|all` downloads one
  sweep        a grid of runs:        lightning-rlm sweep --config X.yaml --grid key=a,b ...
  report       a results table across seeds: lightning-rlm report SWEEP_DIR --metric val/loss
  export       a trained policy as an HF folder: lightning-rlm export --ckpt_path RUN_OR_CKPT --out DIR [--merge]
  rationalize  best-of-K reasoning traces for ground truths: lightning-rlm rationalize --from-rollouts
               RUN/rollouts.jsonl --out rationales.jsonl   (docs/rationalize.md: rationalize -> SFT -> GAN-RL)

Short class names work for methods, DataModules, rewards and callbacks (`class_path: GRPO`, `--model GRPO`).
Bad input ends with one line and exit code 2; LRLM_DEBUG=1 shows the traceback.
"""


def main(args: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    if argv and argv[0] in WORKFLOW:
        if code := import_module(WORKFLOW[argv[0]]).main(argv[1:]):
            sys.exit(code)
        return
    from lightning_rlm.cli import main as cli_main

    cli_main(None if args is None else argv)
