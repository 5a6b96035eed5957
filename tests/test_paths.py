"""`paths.build_cached`: a cached folder is built once, whole, by one builder at a time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lightning_rlm.paths import build_cached


def _writer(calls: list[str], seconds: float = 0.0):
    def write(tmp: Path) -> None:
        calls.append(threading.current_thread().name)
        tmp.mkdir(parents=True)
        time.sleep(seconds)  # a long build: the other builder arrives meanwhile
        (tmp / "weights").write_text(f"written by {calls[-1]}")

    return write


def test_builders_started_at_once_build_the_folder_once(tmp_path) -> None:
    out, calls, results = tmp_path / "model", [], {}

    def run() -> None:
        results[threading.current_thread().name] = build_cached(out, "key-1", _writer(calls, 0.5))

    threads = [threading.Thread(target=run, name=f"builder{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1, calls  # the second waited, then found it built
    assert results == {"builder0": out, "builder1": out}
    assert (out / "BUILD_KEY").read_text() == "key-1\n"
    assert (out / "weights").read_text() == f"written by {calls[0]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.lock"]  # no half-built folder left


def test_a_failed_build_leaves_the_old_folder_and_the_next_run_builds(tmp_path) -> None:
    out, calls = tmp_path / "model", []
    build_cached(out, "key-1", _writer(calls))

    def broken(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_cached(out, "key-2", broken)
    assert (out / "BUILD_KEY").read_text() == "key-1\n"  # the complete folder is still there, stamped as it was
    assert (out / "weights").read_text() == f"written by {calls[0]}"
    build_cached(out, "key-2", _writer(calls))  # the lock was released; the leftover folder is cleared
    assert len(calls) == 2 and (out / "BUILD_KEY").read_text() == "key-2\n"
    assert not out.with_name("model.building").exists()


def test_a_cached_folder_is_kept_unless_its_key_changes_or_force(tmp_path) -> None:
    out, calls = tmp_path / "model", []
    for key, force in [("k", False), ("k", False), ("k", True), ("other", False), ("other", False)]:
        build_cached(out, key, _writer(calls), force=force)
    assert len(calls) == 3 and (out / "BUILD_KEY").read_text() == "other\n"
