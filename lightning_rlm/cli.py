"""`lightning-rlm`: LightningCLI for every method, plus a few workflow commands.

    lightning-rlm fit|validate|test|predict --config configs/<method>/<run>.yaml [--key value ...]
    lightning-rlm base-model [--force]      build (or find in the cache) the tiny TinyStories Llama
    lightning-rlm sweep --config X.yaml --grid key=a,b ...    a grid of runs (lightning_rlm/workflow)
    lightning-rlm report SWEEP_DIR --metric val/loss          a results table across seeds

Methods own their optimizers (`auto_configure_optimizers=False`). Runs log to TensorBoard under
`runs/<config folder>/<config name>/version_N` unless the config names a logger, keep `last.ckpt`
for resuming (`--ckpt_path last`), and save their resolved config next to the logs.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

DEFAULT_LOG_ROOT = "runs"

# Lightning's own deprecation noise from torch's pytree (not actionable for users).
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


class RLMCLI(LightningCLI):
    def __init__(self, args: Optional[list[str]] = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("trainer_defaults", {
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": DEFAULT_LOG_ROOT, "name": "default"}},
        })
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=1234,
            parser_kwargs={"parser_mode": "yaml"},
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always keep last.ckpt, so any run can be resumed with --ckpt_path last.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})

    def before_instantiate_classes(self) -> None:
        """Name the TensorBoard run after the config file (configs/lm/x.yaml → runs/lm/x) when not set."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        logger, configs = cfg.trainer.logger, cfg.get("config") or []
        init = getattr(logger, "init_args", None)
        if configs and init is not None and init.get("name") == "default":
            path = Path(str(configs[0]))
            init.name = f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem
        # A rich progress bar unless the user turned bars off or chose another one.
        callbacks = cfg.trainer.callbacks or []
        if cfg.trainer.enable_progress_bar is not False and not any(
            "ProgressBar" in str(getattr(c, "class_path", type(c).__name__)) for c in callbacks
        ):
            cfg.trainer.callbacks = [*callbacks, Namespace(class_path=f"{RichProgressBar.__module__}.RichProgressBar",
                                                           init_args=Namespace(leave=True))]


def main(args: Optional[list[str]] = None) -> None:
    """Run a LightningCLI subcommand; bad input ends with one clear line and exit code 2."""
    try:
        RLMCLI(args=args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        # Bad input (config values, data, paths): one clear line and a non-zero exit, not a traceback.
        if os.environ.get("LRLM_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lightning-rlm: error: {msg}\n(set LRLM_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
