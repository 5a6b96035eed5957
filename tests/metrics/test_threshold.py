"""TimeToThreshold: the running mean over a full window decides, each threshold is hit once, and the state
(rewards, hits, seconds) survives a checkpoint round trip."""

from __future__ import annotations

import doctest

from lightning_rlm.metrics import threshold
from lightning_rlm.metrics.threshold import TimeToThreshold


def test_doctests_pass() -> None:
    result = doctest.testmod(threshold)
    assert result.attempted > 0 and result.failed == 0


def test_window_must_fill_and_each_threshold_hits_once() -> None:
    t = TimeToThreshold([0.5, 0.9], window=3)
    t.start()
    assert t.update(1.0, 1) == {} and t.update(1.0, 2) == {}  # window not yet full
    hit = t.update(0.0, 3)  # mean 2/3: 0.5 reached, 0.9 not
    assert set(hit) == {"time_to/0.5_s", "time_to/0.5_steps"} and hit["time_to/0.5_steps"] == 3.0
    assert t.update(1.0, 4) == {}  # mean 2/3 again
    hit = t.update(1.0, 5)  # mean 2/3 (0, 1, 1)
    assert hit == {}
    hit = t.update(1.0, 6)  # mean 1
    assert set(hit) == {"time_to/0.9_s", "time_to/0.9_steps"} and hit["time_to/0.9_steps"] == 6.0


def test_state_round_trip_keeps_rewards_hits_and_seconds() -> None:
    t = TimeToThreshold([0.5], window=2)
    t.update(0.6, 1)
    state = t.state_dict()
    state["elapsed_s"] = 100.0  # as if the first run had trained 100 s
    resumed = TimeToThreshold([0.5], window=2)
    resumed.load_state_dict(state)
    resumed.start()
    hit = resumed.update(0.6, 2)  # the checkpointed reward fills the window with this one
    assert hit["time_to/0.5_steps"] == 2.0 and 100.0 <= hit["time_to/0.5_s"] < 110.0
    assert resumed.state_dict()["threshold_hits"] == {"0.5": hit["time_to/0.5_s"]}
