"""What a checkpoint must hold for a run to resume exactly, and a `last.ckpt` that is always current.

`RunCheckpoint` is Lightning's `ModelCheckpoint` plus one save of `last.ckpt` when training ends (Lightning
only saves after validation or at epoch ends, so a run stopped by `max_steps` between validations would
resume from an older state). `RNGStates` stores every process's random streams (global ones and the
module's own generators) in the checkpoint and restores each rank's own at the start of the resumed fit,
and makes validation leave them untouched. The data position is the DataModule's state
(`TextDataModule.state_dict`); methods save their other state (EMA baselines, rounds) themselves.

A run stopped by SIGTERM (what `kill`, SLURM and schedulers send) or Ctrl-C writes `last.ckpt` at the step
it reached and the CLI then exits non-zero (143 and 130), so a stopped run never looks finished.

Lightning writes checkpoints atomically (serialized to memory, then written through an fsspec transaction
that renames a temporary file), so a run killed mid-save leaves the previous `last.ckpt` loadable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_rlm.distributed import own_rank_state, rank_states

__all__ = ["RNGStates", "RunCheckpoint", "StopAt", "Stopped", "rank_states", "own_rank_state", "stop_signal"]


@dataclass
class Stopped:
    """How a run was stopped by a signal: the signal, its exit code, the step and the checkpoint written."""

    signal: str
    exit_code: int
    step: int
    checkpoint: Optional[str]


_stopped: Optional[Stopped] = None


def stop_signal() -> Optional[Stopped]:
    """The signal that stopped the last fit in this process (None when none did)."""
    return _stopped


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that also refreshes `last.ckpt` when training ends (e.g. at `max_steps`) and when a
    signal stops the run (SIGTERM, Ctrl-C), recording the stop for the CLI's exit code."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        global _stopped
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return super().on_exception(trainer, pl_module, exception)
        sig, code = ("SIGTERM", 143) if isinstance(exception, SIGTERMException) else ("SIGINT", 130)
        if (self.save_last and trainer.state.fn == "fit" and not trainer.fast_dev_run and not trainer.sanity_checking
                and trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        _stopped = Stopped(sig, code, trainer.global_step, self.last_model_path or None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if (self.save_last and not trainer.fast_dev_run and not trainer.sanity_checking
                and trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class RNGStates(L.Callback):
    """Exact random streams across a resume, and validation that leaves them untouched.

    Saves in the checkpoint, for every rank, the global states (torch CPU/CUDA, NumPy, Python) and every
    ``torch.Generator`` the LightningModule holds as an attribute (e.g. GRPO's sampling generator), and
    restores each rank's own when the resumed fit starts training. Validation inside ``fit`` runs on the
    same streams but they are put back afterwards, so adding, moving or skipping validation (Lightning
    validates when a run is stopped early) never changes the training trajectory.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    @staticmethod
    def capture(pl_module: L.LightningModule | None = None) -> dict[str, Any]:
        # NumPy's state as a tensor and plain numbers: checkpoints load with torch.load(weights_only=True).
        key, keys, pos, has_gauss, gauss = np.random.get_state()
        numpy_state = {"key": key, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if pl_module is not None:
            state["module_generators"] = {name: (str(g.device), g.get_state()) for name, g in vars(pl_module).items()
                                          if isinstance(g, torch.Generator)}
        return state

    @staticmethod
    def apply(state: dict[str, Any], pl_module: L.LightningModule | None = None) -> None:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if pl_module is not None:
            for name, (device, gen_state) in state.get("module_generators", {}).items():
                g = getattr(pl_module, name, None)
                if not isinstance(g, torch.Generator):
                    g = torch.Generator(device=device)
                    setattr(pl_module, name, g)
                g.set_state(gen_state)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Saved mid-validation (a stop signal): the streams as they were before validation, as they are restored
        state = self._before_validation if self._before_validation is not None else self.capture(pl_module)
        checkpoint["rng_states"] = rank_states(state)  # a collective: dumped on every rank

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        self._to_restore = own_rank_state(states) if states else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not at load time: setting up data and modules between loading and the first step draws randomness
        # that the uninterrupted run drew before it saved.
        if self._to_restore is not None:
            self.apply(self._to_restore, pl_module)
            self._to_restore = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._before_validation = self.capture(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._before_validation is not None:
            self.apply(self._before_validation, pl_module)
            self._before_validation = None


class StopAt(L.Callback):
    """Stop cleanly after `step` optimizer steps, as a preemption would, while schedules still span
    `max_steps` (e.g. to test that a resumed run continues exactly, or to split a run over job slots)."""

    def __init__(self, step: int) -> None:
        if step < 1:
            raise ValueError(f"StopAt step must be >= 1, got {step}")
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
