"""Run folders that mean what they say: resuming finds the run, and nothing a run wrote is overwritten.

A run lives in `<save_dir>/<name>/version_N/` (the logger's folder): `config.yaml`, events, and
`checkpoints/last.ckpt`. The CLI calls these before any class is built:

- `resolve_ckpt_path_last`: `--ckpt_path last` means the newest `last.ckpt` among the versions of this
  run name, and `fit` continues in that version's folder (same TensorBoard run, same checkpoints). When there
  is none it is one clear error, never a silent fresh start.
- `check_run_folder`: a logger `version` or `checkpoint.dirpath` that names a folder already holding
  checkpoints is refused unless the run resumes from a checkpoint in that folder.
- `KeepConfigs` saves the resolved config as `config.yaml`, or, when resuming in a folder that has one, as
  `config.resume-<k>.yaml` beside it: the config that produced the checkpoints is never overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from jsonargparse import Namespace
from lightning.pytorch.cli import SaveConfigCallback

LOGGERS_WITH_FOLDERS = ("TensorBoardLogger", "CSVLogger")


def _logger_args(cfg: Namespace) -> Optional[Namespace]:
    logger = cfg.trainer.get("logger")
    if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith(LOGGERS_WITH_FOLDERS):
        return logger.get("init_args")
    return None


def run_root(cfg: Namespace) -> Optional[Path]:
    """`<save_dir>/<name>`: the folder holding this run name's versions (None for other loggers)."""
    init = _logger_args(cfg)
    if init is None:
        return None
    save_dir = init.get("save_dir") or cfg.trainer.get("default_root_dir") or "."
    return Path(str(save_dir)) / str(init.get("name") or "")


def version_dir(root: Path, version: Any) -> Path:
    return root / (version if isinstance(version, str) else f"version_{version}")


def resolve_ckpt_path_last(cfg: Namespace, subcommand: str) -> None:
    """Turn `ckpt_path: last` into the newest `last.ckpt` of this run name; `fit` continues in its folder."""
    if cfg.get("ckpt_path") != "last":
        return
    root, init = run_root(cfg), _logger_args(cfg)
    dirpath = cfg.get("checkpoint") and cfg.checkpoint.get("dirpath")
    if dirpath:  # checkpoints kept apart from the logs (e.g. a sweep's runs)
        last = Path(str(dirpath)) / "last.ckpt"
        if not last.is_file():
            raise ValueError(f"--ckpt_path last: no checkpoint {last} to resume from; start without --ckpt_path")
        cfg.ckpt_path = str(last)
        return
    if root is None:
        return  # another logger: Lightning's own lookup in the checkpoint callback's folder
    if init.get("version") is not None:
        candidates = [version_dir(root, init.version) / "checkpoints" / "last.ckpt"]
    else:
        candidates = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        where = version_dir(root, init.version) if init.get("version") is not None else root / "version_*"
        raise ValueError(f"--ckpt_path last: no checkpoint {where / 'checkpoints' / 'last.ckpt'} to resume from; "
                         "start without --ckpt_path, or give the path of a checkpoint")
    last = candidates[-1]
    cfg.ckpt_path = str(last)
    if subcommand == "fit":
        init.version = last.parents[1].name  # continue in that run's folder
        print(f"lightning-rlm: resuming from {last}; writing to {last.parents[1]}", flush=True)


def check_run_folder(cfg: Namespace, subcommand: str) -> None:
    """A checkpoint folder that already holds checkpoints (an explicit logger version's, or an explicit
    `checkpoint.dirpath`) is refused unless the run resumes from a checkpoint in it."""
    if subcommand != "fit":
        return
    root, init = run_root(cfg), _logger_args(cfg)
    dirpath = cfg.get("checkpoint") and cfg.checkpoint.get("dirpath")
    if dirpath:
        folder, what = Path(str(dirpath)), f"checkpoint.dirpath {str(dirpath)!r}"
    elif root is not None and init.get("version") is not None:
        folder, what = version_dir(root, init.version) / "checkpoints", f"trainer.logger version {init.version!r}"
    else:
        return  # a new version folder every run
    ckpts = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    ckpt_path = cfg.get("ckpt_path")
    if ckpts and not (ckpt_path and Path(str(ckpt_path)).resolve().parent == folder.resolve()):
        raise ValueError(f"{what}: {folder} already holds checkpoints ({ckpts[0].name}) of an earlier run; "
                         "resume it with --ckpt_path last (or the checkpoint's path), or choose another folder "
                         "(nothing there is changed)")


class KeepConfigs(SaveConfigCallback):
    """`SaveConfigCallback` that never overwrites a run's config: a resumed run's goes beside it."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir:
            return super().setup(trainer, pl_module, stage)
        log_dir = trainer.log_dir
        if log_dir is not None and os.path.isfile(os.path.join(log_dir, self.config_filename)):
            stem, suffix = os.path.splitext(self.config_filename)
            k = 1
            while os.path.exists(os.path.join(log_dir, f"{stem}.resume-{k}{suffix}")):
                k += 1
            self.config_filename = f"{stem}.resume-{k}{suffix}"
        self.overwrite = False
        return super().setup(trainer, pl_module, stage)


# A run that fails on bad input after its logger made `version_N` (e.g. data checked at setup) must not leave
# an empty folder behind, which would shift the numbers of later runs. The CLI remembers the versions that
# existed before it built anything and removes, on such a failure, new ones that hold no checkpoint and no
# logged value.
_before: Optional[tuple[Path, set[str]]] = None


def remember_runs(cfg: Namespace) -> None:
    global _before
    root = run_root(cfg)
    _before = (root, {p.name for p in root.iterdir()} if root is not None and root.is_dir() else set())


def forget_new_runs() -> None:
    global _before
    _before = None


def _holds_results(folder: Path) -> bool:
    if any(folder.rglob("*.ckpt")) or any(folder.rglob("*.jsonl")):
        return True
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        if any(acc.Tags().get(kind) for kind in ("scalars", "tensors", "images")):
            return True
    return False


def remove_empty_new_runs() -> list[Path]:
    """Remove the version folders made since `remember_runs` that hold no results; return them."""
    import shutil

    if _before is None or _before[0] is None or not _before[0].is_dir():
        return []
    root, existing = _before
    removed = []
    for folder in sorted(root.iterdir()):
        if folder.name not in existing and folder.is_dir() and not _holds_results(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
