"""`--ckpt_path last`, explicit versions and checkpoint folders, and configs that are never overwritten."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from jsonargparse import Namespace

from lightning_rlm.workflow.run_folders import KeepConfigs, check_run_folder, resolve_ckpt_path_last


def _cfg(save_dir: Path, version=None, ckpt_path=None, dirpath=None) -> Namespace:
    logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                       init_args=Namespace(save_dir=str(save_dir), name="lm/x", version=version))
    return Namespace(trainer=Namespace(logger=logger, default_root_dir=None), ckpt_path=ckpt_path,
                     checkpoint=Namespace(dirpath=dirpath))


def _last(save_dir: Path, version: str) -> Path:
    p = save_dir / "lm" / "x" / version / "checkpoints" / "last.ckpt"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"weights")
    return p


def test_ckpt_path_last_is_the_newest_run_and_fit_continues_in_its_folder(tmp_path):
    old, new = _last(tmp_path, "version_3"), _last(tmp_path, "version_1")
    os.utime(old, (time.time() - 100, time.time() - 100))
    cfg = _cfg(tmp_path, ckpt_path="last")
    resolve_ckpt_path_last(cfg, "fit")
    assert cfg.ckpt_path == str(new) and cfg.trainer.logger.init_args.version == "version_1"
    cfg = _cfg(tmp_path, ckpt_path="last")
    resolve_ckpt_path_last(cfg, "validate")  # evaluation does not move the logs
    assert cfg.ckpt_path == str(new) and cfg.trainer.logger.init_args.version is None
    cfg = _cfg(tmp_path, version=3, ckpt_path="last")  # an explicit version: that one
    resolve_ckpt_path_last(cfg, "fit")
    assert cfg.ckpt_path == str(old)


def test_ckpt_path_last_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"no checkpoint .*version_\*.*last\.ckpt to resume from"):
        resolve_ckpt_path_last(_cfg(tmp_path, ckpt_path="last"), "fit")
    with pytest.raises(ValueError, match="no checkpoint"):
        resolve_ckpt_path_last(_cfg(tmp_path, ckpt_path="last", dirpath=str(tmp_path / "ck")), "fit")


def test_a_folder_with_checkpoints_is_refused_unless_resumed(tmp_path):
    last = _last(tmp_path, "version_0")
    with pytest.raises(ValueError, match=r"trainer.logger version 0: .* already holds checkpoints \(last.ckpt\)"):
        check_run_folder(_cfg(tmp_path, version=0), "fit")
    check_run_folder(_cfg(tmp_path, version=0, ckpt_path=str(last)), "fit")  # resuming it
    check_run_folder(_cfg(tmp_path, version=1), "fit")  # an empty version
    check_run_folder(_cfg(tmp_path), "fit")  # a new version folder
    with pytest.raises(ValueError, match="checkpoint.dirpath"):
        check_run_folder(_cfg(tmp_path, dirpath=str(last.parent)), "fit")
    assert last.read_bytes() == b"weights"


class _Trainer:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.is_global_zero = str(log_dir), True

    @property
    def strategy(self):  # SaveConfigCallback broadcasts through it
        return self

    def broadcast(self, obj, src=0):
        return obj

    def barrier(self, *args):
        pass


def test_a_resumed_run_keeps_the_config_that_made_its_checkpoints(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--lr", type=float)
    (tmp_path / "config.yaml").write_text("lr: 0.1\n")
    for k in (1, 2):
        cb = KeepConfigs(parser, parser.parse_args(["--lr", "0.5"]))
        cb.setup(_Trainer(tmp_path), None, "fit")
        assert (tmp_path / f"config.resume-{k}.yaml").read_text().strip() == "lr: 0.5"
    assert (tmp_path / "config.yaml").read_text() == "lr: 0.1\n"
