"""Shared fixtures: real text from the data root, small threads, an isolated cache."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_rlm.data.paths import data_root

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # trained tokenizers go to a per-session cache, never the user's
    monkeypatch.setenv("LRLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lrlm_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data():
    root = data_root()
    if not (root / "tinyshakespeare" / "input.txt").exists():
        pytest.fail(f"the real text samples are missing: expected them under {root} (set LRLM_DATA_DIR)")
    return root
