"""The text metrics give the same value from 2 gloo processes (each seeing half the data) as from one.

Also checks `all_gather_objects` (how the callbacks pool rollout strings across ranks) in the same
processes, and the corner case of a rank that never called `update` on a set-valued metric.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_rlm.callbacks.rollout import all_gather_objects
from lightning_rlm.data.paths import resolve_data_path
from lightning_rlm.metrics import (
    DegenerateFlag,
    DistinctN,
    GroupJaccard,
    MeanLength,
    RepeatedNgramLoop,
    UniqueFirstSentences,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
GROUP = 4


def _texts() -> list[str]:
    """24 real paragraphs plus repeats and a loop, so the two halves share n-grams and first sentences."""
    text = resolve_data_path("tinystories/tinystories_val_head.txt").read_text()
    paras = [p.strip() for p in text.split("\n\n") if p.strip()][:24]
    loop = "the dog ran and ran and ran and ran and ran and ran and ran."
    return paras[:12] + [paras[0], paras[1], loop, loop] + paras[12:] + [paras[0], paras[2], loop, paras[3]]


def _metrics() -> dict[str, torch.nn.Module]:
    return {
        "group_jaccard": GroupJaccard(GROUP),
        "distinct2": DistinctN(2),
        "distinct1": DistinctN(1),
        "unique_first": UniqueFirstSentences(),
        "coherence": RepeatedNgramLoop(n=2, min_repeats=3),
        "mean_length": MeanLength(),
        "degenerate": DegenerateFlag(min_distinct2=0.9),
        "degenerate_stats": DegenerateFlag(),
        "empty_on_rank1": UniqueFirstSentences(),
    }


def _values(metrics: dict[str, torch.nn.Module]) -> dict[str, float]:
    out = {name: float(m.compute()) for name, m in metrics.items()}
    # stats() reads states directly, so read it inside the synced context like compute() does
    with metrics["degenerate_stats"].sync_context():
        out.update({f"stats/{k}": v for k, v in metrics["degenerate_stats"].stats().items()})
    return out


def _update(metrics: dict[str, torch.nn.Module], texts: list[str], rank: int) -> None:
    for name, m in metrics.items():
        if name == "empty_on_rank1":
            if rank == 0:
                m.update(texts)
            continue
        # two updates per rank, split at a group boundary
        m.update(texts[:GROUP])
        m.update(texts[GROUP:])


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        texts = _texts()
        half = len(texts) // 2
        metrics = _metrics()
        _update(metrics, texts[:half] if rank == 0 else texts[half:], rank)
        values = _values(metrics)
        gathered = all_gather_objects({"rank": rank, "texts": [f"r{rank}-a", f"r{rank}-b"]})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"values": values, "gathered": gathered}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_metrics_match_between_one_and_two_processes(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = _texts()
    single = _metrics()
    _update(single, texts[: len(texts) // 2], rank=0)  # the "empty_on_rank1" reference: rank 0's half only
    empty_expected = float(single["empty_on_rank1"].compute())
    single = _metrics()
    for name, m in single.items():
        m.update(texts[: len(texts) // 2] if name == "empty_on_rank1" else texts)
    expected = _values(single)
    assert expected["empty_on_rank1"] == empty_expected

    # the halves share n-grams/first sentences, so summing per-rank distinct counts would be wrong
    halves = [DistinctN(2), DistinctN(2)]
    halves[0].update(texts[: len(texts) // 2])
    halves[1].update(texts[len(texts) // 2 :])
    naive_distinct = sum(h._num_unique() for h in halves) / sum(int(h.total) for h in halves)
    assert naive_distinct != pytest.approx(expected["distinct2"])

    # spawned children unpickle `_worker` by its module name `tests.metrics.test_metrics_ddp`
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")

    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["values"] == pytest.approx(expected), f"rank {rank}"
        assert result["gathered"] == [
            {"rank": 0, "texts": ["r0-a", "r0-b"]},
            {"rank": 1, "texts": ["r1-a", "r1-b"]},
        ]
