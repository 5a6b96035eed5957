"""`lightning-rlm`: LightningCLI for every method, plus a few workflow commands.

    lightning-rlm fit|validate|test|predict --config configs/<method>/<run>.yaml [--key value ...]
    lightning-rlm base-model [--force]      build (or find in the cache) the tiny TinyStories Llama
    lightning-rlm sweep --config X.yaml --grid key=a,b ...    a grid of runs (lightning_rlm/workflow)
    lightning-rlm report SWEEP_DIR --metric val/loss          a results table across seeds
    lightning-rlm export --ckpt_path X.ckpt --out DIR [--merge]   the trained LM as a Hugging Face folder

Methods own their optimizers (`auto_configure_optimizers=False`). Runs log to TensorBoard under
`runs/<config folder>/<config name>/version_N` unless the config names a logger, keep `last.ckpt`
for resuming (`--ckpt_path last`), and save their resolved config next to the logs.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Optional

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so that their classes are known subclasses: `class_path: GRPO`, `--model GRPO`, `SentenceLength`,
# `PromptDataModule` and `CompletionsLogger` work as short names, and `--help` lists them.
import lightning_rlm.callbacks
import lightning_rlm.data
import lightning_rlm.methods
import lightning_rlm.rewards
import lightning_rlm.tasks  # noqa: F401
from lightning_rlm.callbacks.checkpointing import RNGStates, RunCheckpoint, stop_signal
from lightning_rlm.callbacks.downstream import DownstreamEvaluation
from lightning_rlm.callbacks.predictions import PredictionsWriter
from lightning_rlm.workflow.preflight import check_checkpoint, preflight
from lightning_rlm.workflow.run_folders import (
    KeepConfigs,
    check_run_folder,
    forget_new_runs,
    remember_runs,
    remove_empty_new_runs,
    resolve_ckpt_path_last,
)

DEFAULT_LOG_ROOT = "runs"
# the final metrics shown beside the config in TensorBoard's HParams tab
HPARAMS_METRIC_PREFIXES = ("val/", "test/", "eval/", "train/reward", "train/loss", "train/kl")


class HParamsSummary(L.Callback):
    """At the end of fit, `params` (the flat config) with the final metrics under `hparams/<name>`, so the
    curves of the metrics themselves stay untouched."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.logger is None or not trainer.is_global_zero:
            return
        metrics = {f"hparams/{k}": float(v) for k, v in trainer.callback_metrics.items()
                   if getattr(v, "numel", lambda: 1)() == 1 and k.startswith(HPARAMS_METRIC_PREFIXES)}
        try:
            trainer.logger.log_hyperparams(self.params, metrics=metrics or None)
        except TypeError:  # a logger whose log_hyperparams takes no metrics
            trainer.logger.log_hyperparams(self.params)
        trainer.logger.save()


def flat_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as `{"model.init_args.lr": 1e-4, ...}`; lists and None become strings (HParams values
    must be numbers, strings or booleans)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flat_config(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    out[key] = tree if isinstance(tree, (int, float, str, bool)) else str(tree)
    return out

# Lightning's own deprecation noise from torch's pytree (not actionable for users).
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
# Lightning looks for resumable *DataLoaders*; ours resume through the DataModule's state (data/sampler.py).
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


class RLMCLI(LightningCLI):
    def __init__(self, args: Optional[list[str]] = None, run: bool = True,
                 parser_kwargs: Optional[dict] = None, **kwargs) -> None:
        kwargs.setdefault("trainer_defaults", {
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": DEFAULT_LOG_ROOT, "name": "default", "default_hp_metric": False}},
            # DataModules shard each global batch over processes themselves (lightning_rlm.data.sampler).
            "use_distributed_sampler": False,
        })
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_callback=KeepConfigs,
            seed_everything_default=1234,
            parser_kwargs=parser_kwargs or {"parser_mode": "yaml"},
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always keep last.ckpt (also at the end of training), so any run can be resumed with --ckpt_path last.
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        # Downstream tasks (GSM8K, CommonsenseQA, ...) at validation/test; none unless a config lists some,
        # e.g. --config configs/presets/eval_reasoning.yaml
        parser.add_lightning_class_args(DownstreamEvaluation, "evaluation")
        # `predict` writes what predict_step returns to <run folder>/predictions.jsonl
        parser.add_lightning_class_args(PredictionsWriter, "predictions")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, name the run after its config file, then check the config before anything is built.

        Runs before Lightning reads the hyperparameters of `ckpt_path`, so a checkpoint that is unreadable or
        of another method is refused here rather than swapping the method, and `--ckpt_path last` is already a
        file by then.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else self.config
        # Name the TensorBoard run after the config file (configs/lm/x.yaml → runs/lm/x) when not set.
        logger, configs = cfg.trainer.logger, cfg.get("config") or []
        init = getattr(logger, "init_args", None)
        if configs and init is not None and init.get("name") == "default":
            path = Path(str(configs[0]))
            init.name = f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem
        # --trainer.default_root_dir moves the default run folder too: <root>/<config folder>/<config name>/
        root = cfg.trainer.get("default_root_dir")
        if root and init is not None and init.get("save_dir") == DEFAULT_LOG_ROOT:
            init.save_dir = str(root)
        if subcommand:
            preflight(cfg, subcommand)
            resolve_ckpt_path_last(cfg, subcommand)
            check_checkpoint(cfg)  # also the file `last` resolved to
            check_run_folder(cfg, subcommand)
            remember_runs(cfg)  # a run that fails before it logs anything leaves no empty version folder

    def before_fit(self) -> None:
        """TensorBoard's HParams tab gets the whole resolved config (model, data, trainer) beside the run's final
        metrics, written at the end of fit while the logger is still open (see `HParamsSummary`)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        params = {k: v for k, v in flat_config(config.as_dict()).items() if not k.startswith(("config", "ckpt_path"))}
        self.trainer.callbacks.append(HParamsSummary(params))

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_precision(cfg)
        if self.subcommand in (None, "fit"):
            check_round_schedule(cfg)
        # A rich progress bar unless the user turned bars off or chose another one.
        callbacks = cfg.trainer.callbacks or []
        if cfg.trainer.enable_progress_bar is not False and not any(
            "ProgressBar" in str(getattr(c, "class_path", type(c).__name__)) for c in callbacks
        ):
            callbacks = [*callbacks, Namespace(class_path=f"{RichProgressBar.__module__}.RichProgressBar",
                                               init_args=Namespace(leave=True))]
        # Random states in every checkpoint, for exact resume.
        if not any("RNGStates" in str(getattr(c, "class_path", type(c).__name__)) for c in callbacks):
            callbacks = [*callbacks, Namespace(class_path=f"{RNGStates.__module__}.RNGStates", init_args=Namespace())]
        cfg.trainer.callbacks = callbacks


def clean_error(message: str) -> str:
    """The reason inside jsonargparse's nested "Does not validate against any of the Union subtypes" report.

    A bad init argument of a class given by class_path (a method, a reward, a DataModule) reaches the user
    wrapped in one such report per nesting level, with every other union member's rejection ("Expected a
    <class 'NoneType'>") and a dump of the whole config. Keep the config keys and the innermost reasons.
    """
    lines = [line.strip() for line in str(message).splitlines()]
    if not any(line.startswith("Errors:") for line in lines):
        return str(message).strip()
    keys = [m.group(1) for line in lines if (m := re.match(r'Parser key "([^"]+)"', line))]
    noise = ("- Problem with given class_path", "- Not a valid", "- Expected a", "- Does not validate")
    reasons = [line[2:] for line in lines if line.startswith("- ") and not line.startswith(noise)]
    for line, following in zip(lines, lines[1:]):  # a class that cannot be imported: the reason follows
        if line.startswith("- Problem with given class_path") and not following.startswith(
                ("Parser key", "Does not validate", "- ", "Errors:")):
            reasons.append(f"{line[len('- Problem with given '):].rstrip(':')}: {following}")
    if not reasons:
        return str(message).strip()
    where = f"{'.'.join(keys)}: " if keys else ""
    return where + "; ".join(reasons)


def check_precision(cfg: Namespace) -> None:
    """fp16 on a CPU fails before any work: no GradScaler there and many fp16 CPU kernels are missing."""
    precision = str(cfg.trainer.get("precision") or "32-true")
    accelerator = str(cfg.trainer.get("accelerator") or "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not _gpu_available())
    if on_cpu and precision in ("16", "16-mixed", "16-true"):
        raise ValueError(
            f"trainer.precision={precision!r} is not supported on the CPU; use '32-true' or 'bf16-mixed' "
            "(or run on a GPU)"
        )


def check_round_schedule(cfg: Namespace) -> None:
    """KL-barrier SFT rounds that cannot fit trainer.max_steps fail before the model loads."""
    model = cfg.get("model")
    if not str(getattr(model, "class_path", "")).endswith(".SFTKLBarrier"):
        return
    from lightning_rlm.data.rounds import round_schedule

    args, fast = model.get("init_args") or Namespace(), cfg.trainer.get("fast_dev_run")
    round_schedule(args.get("n_rounds", 4), args.get("steps_per_round"),
                   int(fast) if fast else cfg.trainer.get("max_steps"), bool(fast))


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def user_error(e: BaseException) -> Optional[str]:
    """The one line a user gets for an error caused by their input, or None for a bug (traceback kept).

    The one mapping for everything the CLI can raise on bad input: our own checks and readers (ValueError,
    KeyError, FileNotFoundError), jsonargparse (ArgumentError), Lightning (MisconfigurationException) and the
    OS or the hub (OSError: a folder under a file, no permission, no network for a model name).
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(e, KeyError):
        return clean_error(str(e.args[0] if e.args else e))
    if isinstance(e, (ValueError, ArgumentError, MisconfigurationException, FileNotFoundError)):
        return clean_error(str(e))
    if isinstance(e, OSError):
        if e.filename is not None and e.strerror:
            return f"{e.strerror}: {e.filename}"
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def check_config_files(args: list[str]) -> None:
    """Every `--config FILE` parses as YAML (jsonargparse would name the text `<unicode string>`, not the file)."""
    import yaml

    for flag, value in zip(args, args[1:] + [""]):
        path = value if flag in ("--config", "-c") else flag.split("=", 1)[1] if flag.startswith("--config=") else None
        if not path or not Path(path).is_file():
            continue
        try:
            yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
            raise ValueError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text; save the config as UTF-8") from None


def main(args: Optional[list[str]] = None) -> None:
    """Run a LightningCLI subcommand; bad input ends with one clear line and exit code 2."""
    forget_new_runs()
    try:
        check_config_files(list(sys.argv[1:] if args is None else args))
        RLMCLI(args=args, parser_kwargs={"parser_mode": "yaml", "exit_on_error": False})
    except Exception as e:
        message = user_error(e)
        if message is None or os.environ.get("LRLM_DEBUG"):
            raise
        # Bad input (config values, data, paths): one clear line and a non-zero exit, not a traceback.
        remove_empty_new_runs()
        print(f"lightning-rlm: error: {message}\n(set LRLM_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    except SystemExit:
        # SIGTERM / Ctrl-C: last.ckpt is written; a non-zero exit so that nobody takes the run for finished
        if (stopped := stop_signal()) is None:
            raise
        where = f"; {stopped.checkpoint} resumes it (--ckpt_path last)" if stopped.checkpoint else ""
        print(f"lightning-rlm: stopped by {stopped.signal} at step {stopped.step}{where}", file=sys.stderr)
        sys.exit(stopped.exit_code)
