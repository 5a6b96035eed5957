"""evaluate(): batched greedy generation against one-at-a-time, the seeded subset, stop tokens, and the same
accuracy and records from 1 and 2 (gloo) processes on the same examples."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_rlm.tasks import (
    GSM8K,
    CommonsenseQA,
    evaluate,
    generate_greedy,
    select_indices,
    stop_token_ids,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "Once upon a time",
    "The cat sat on the mat and looked at the big red",
    "Tom",
    "She said that the dog",
]


def test_batched_generation_equals_one_at_a_time(tiny_lm):
    model, tok = tiny_lm
    batched = generate_greedy(model, tok, PROMPTS, max_new_tokens=12, batch_size=4)
    single = [generate_greedy(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert all(batched) and len(set(batched)) > 1  # real, distinct text, not padding


def test_subset_is_fixed_and_seeded():
    assert select_indices(100, 10, seed=0) == select_indices(100, 10, seed=0)
    assert select_indices(100, 10, seed=0) != select_indices(100, 10, seed=1)
    assert select_indices(100, 10, seed=0) == sorted(select_indices(100, 10, seed=0))
    assert select_indices(5, 10, seed=0) == select_indices(5, None, seed=0) == [0, 1, 2, 3, 4]


def test_generation_stops_at_the_end_of_turn_token(tiny_lm):
    model, tok = tiny_lm
    assert stop_token_ids(tok, model) == [tok.eos_token_id]
    chat_tok = type(tok).from_pretrained(tok.name_or_path)
    chat_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert stop_token_ids(chat_tok) == [tok.eos_token_id]  # the token alone: not a turn end without a template
    chat_tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    assert stop_token_ids(chat_tok) == [tok.eos_token_id, chat_tok.convert_tokens_to_ids("<|im_end|>")]


def test_gsm8k_generation_runs_and_grades(tiny_lm, need_data):
    need_data("gsm8k/test.jsonl")
    model, tok = tiny_lm
    model.train()
    result = evaluate(GSM8K(), model, tok, limit=3, seed=0, batch_size=2, max_new_tokens=8)
    assert model.training  # the training flag is restored
    assert result["n"] == 3 and result["scoring"] == "generate" and 0 <= result["accuracy"] <= 1
    for record in result["records"]:
        assert record["correct"] == (
            record["prediction"] == record["gold"] and record["prediction"] is not None
        )
    with pytest.raises(ValueError, match="generation task"):
        evaluate(GSM8K(), model, tok, limit=1, scoring="mean")


def _run(model_dir: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = {}
    # 7 and 3 examples: uneven shards
    out["csqa"] = evaluate(CommonsenseQA(), model, tok, limit=7, seed=5, batch_size=2)
    out["gsm8k"] = evaluate(GSM8K(), model, tok, limit=3, seed=5, batch_size=2, max_new_tokens=6)
    for r in out.values():
        for rec in r["records"]:
            rec.pop("loglik_sum", None), rec.pop("loglik_mean", None)  # floats: compared by accuracy instead
    return out


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(_run(model_dir)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_one_and_two_processes_give_the_same_accuracy(tiny_llama_dir, tmp_path, need_data, monkeypatch):
    need_data("commonsenseqa/dev_rand_split.jsonl")
    need_data("gsm8k/test.jsonl")
    expected = json.loads(json.dumps(_run(str(tiny_llama_dir))))
    assert expected["csqa"]["n"] == 7 and expected["gsm8k"]["n"] == 3
    # spawned children unpickle `_worker` by its module name `tests.tasks.test_evaluate`
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    mp.start_processes(
        _worker,
        args=(_free_port(), str(tiny_llama_dir), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == expected, f"rank {rank}"
