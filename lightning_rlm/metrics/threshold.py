"""Time to a reward threshold: the wall-clock seconds and optimizer steps until the mean reward of the last
``window`` steps first reaches each threshold, counted across resumes (the state is checkpointed)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["TimeToThreshold"]


class TimeToThreshold:
    """Tracks when a running mean of the training reward first reaches each of ``thresholds``.

    >>> t = TimeToThreshold([0.5], window=2)
    >>> t.update(0.4, step=1), sorted(t.update(0.7, step=2))
    ({}, ['time_to/0.5_s', 'time_to/0.5_steps'])
    >>> t.update(0.9, step=3)  # reached already
    {}
    """

    def __init__(self, thresholds: Sequence[float], window: int = 10) -> None:
        self.thresholds = tuple(thresholds)
        self.recent: deque[float] = deque(maxlen=window)
        self.hits: dict[str, float] = {}  # f"{threshold:g}" -> seconds
        self._start: Optional[float] = None
        self._elapsed_before = 0.0

    def start(self) -> None:
        """The clock starts (at the start of training; a resumed run adds its checkpointed seconds)."""
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        return self._elapsed_before + (time.perf_counter() - (self._start or time.perf_counter()))

    def update(self, reward: float, step: int) -> dict[str, float]:
        """Add one step's reward; the ``time_to/<t>_s`` and ``time_to/<t>_steps`` of thresholds reached now."""
        self.recent.append(reward)
        mean = sum(self.recent) / len(self.recent)
        out: dict[str, float] = {}
        for t in self.thresholds:
            key = f"{t:g}"
            if key not in self.hits and len(self.recent) == self.recent.maxlen and mean >= t:
                self.hits[key] = elapsed = self.elapsed()
                out |= {f"time_to/{key}_s": elapsed, f"time_to/{key}_steps": float(step)}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"recent_rewards": list(self.recent), "threshold_hits": dict(self.hits), "elapsed_s": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque(state.get("recent_rewards", []), maxlen=self.recent.maxlen)
        self.hits = dict(state.get("threshold_hits", {}))
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
