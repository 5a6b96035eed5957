"""The `lightning-rlm` entry point: workflow commands first (no Lightning import), else LightningCLI."""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Optional

WORKFLOW = {"base-model": "lightning_rlm.workflow.base_model", "sweep": "lightning_rlm.workflow.sweep",
            "report": "lightning_rlm.workflow.report", "data": "lightning_rlm.workflow.data",
            "export": "lightning_rlm.workflow.export"}


def main(args: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in WORKFLOW:
        if code := import_module(WORKFLOW[argv[0]]).main(argv[1:]):
            sys.exit(code)
        return
    from lightning_rlm.cli import main as cli_main

    cli_main(None if args is None else argv)
