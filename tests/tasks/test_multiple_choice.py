"""CommonsenseQA: the real file, batched choice log-likelihoods against a hand loop, letter scoring."""

from __future__ import annotations

import importlib

import pytest
import torch

from lightning_rlm.tasks import CommonsenseQA, evaluate, extract_letter

# the module (the package's `evaluate` attribute is the function)
evaluate_module = importlib.import_module("lightning_rlm.tasks.evaluate")


def test_commonsenseqa_reads_the_real_file(need_data):
    need_data("commonsenseqa/dev_rand_split.jsonl")
    task = CommonsenseQA()
    examples = task.examples()
    assert len(examples) == 1221
    assert all(
        ex.labels == list("ABCDE") and len(ex.choices) == 5 and ex.gold in ex.labels for ex in examples
    )
    first = examples[0]
    assert first.choices[first.gold_index] == "bank" and first.gold == "A"
    assert task.prompt(first, None) == f"Question: {first.question}\nAnswer:"
    assert task.continuation("bank") == " bank"
    letter = task.prompt(first, None, letter=True)
    assert "\nA. bank\nB. library\n" in letter and letter.endswith("Answer:")
    shots = CommonsenseQA(num_fewshot=3).prompt(first, None)
    assert shots.count("Question:") == 4 and shots.endswith(task.prompt(first, None))


def _hand_loop(model, tok, task, indices):
    """Per example, per choice: one unpadded forward of context + choice, summing the choice's log-probs."""
    out = {}
    for i in indices:
        ex = task.examples()[i]
        context = task.prompt(ex, tok)
        sums, means = [], []
        for choice in ex.choices:
            ctx_ids = tok.encode(context)
            ids = tok.encode(context + task.continuation(choice))
            assert ids[: len(ctx_ids)] == ctx_ids
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0]  # [T, V]
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            total = sum(float(logprobs[t - 1, ids[t]]) for t in range(len(ctx_ids), len(ids)))
            sums.append(total)
            means.append(total / (len(ids) - len(ctx_ids)))
        out[i] = (sums, means)
    return out


@pytest.mark.parametrize("share_context", [True, False])
def test_choice_logliks_equal_a_hand_loop(tiny_lm, need_data, share_context, monkeypatch):
    need_data("commonsenseqa/dev_rand_split.jsonl")
    model, tok = tiny_lm
    if share_context:  # the shared-context (KV cache) path must really run, not fall back to full rows
        monkeypatch.setattr(
            evaluate_module, "_logliks_full", lambda *a: pytest.fail("fell back to full rows")
        )
    task = CommonsenseQA(num_fewshot=1)
    result = evaluate(
        task, model, tok, limit=6, seed=3, batch_size=4, share_context=share_context
    )  # 2 batches, rows of mixed lengths
    assert result["n"] == 6 and result["scoring"] == "mean"
    expected = _hand_loop(model, tok, task, [r["index"] for r in result["records"]])
    for record in result["records"]:
        sums, means = expected[record["index"]]
        assert record["loglik_sum"] == pytest.approx(sums, abs=1e-5)
        assert record["loglik_mean"] == pytest.approx(means, abs=1e-5)
        assert record["choice_sum"] == "ABCDE"[max(range(5), key=lambda c: sums[c])]
        assert record["choice_mean"] == "ABCDE"[max(range(5), key=lambda c: means[c])]
    n_sum = sum(r["correct_sum"] for r in result["records"])
    assert result["accuracy_sum"] == n_sum / 6 and result["accuracy"] == result["accuracy_mean"]
    assert evaluate(task, model, tok, limit=6, seed=3, batch_size=1, scoring="sum")["accuracy"] == n_sum / 6


def test_letter_scoring_runs(tiny_lm, need_data):
    need_data("commonsenseqa/dev_rand_split.jsonl")
    model, tok = tiny_lm
    result = evaluate(CommonsenseQA(scoring="letter"), model, tok, limit=4, batch_size=4, max_new_tokens=4)
    assert result["n"] == 4 and 0 <= result["accuracy"] <= 1 and result["scoring"] == "letter"
    assert {"completion", "prediction", "gold", "correct"} <= set(result["records"][0])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        (" (C) because", "C"),
        ("E.", "E"),
        ("Answer: D", "D"),
        ("A bank.", "A"),  # the article reads as a label: the first standalone label wins
        ("the library", "B"),
        ("bank or library", None),
        ("nothing", None),
        ("AB", None),
    ],
)
def test_extract_letter(text, expected):
    assert extract_letter(text, list("ABCDE"), ["bank", "library", "store", "mall", "york"]) == expected


@pytest.mark.slow
def test_smollm2_zero_shot_on_20_questions(need_data, capsys):
    """SmolLM2-135M-Instruct, zero-shot, 20 seeded dev questions, plain and chat prompts, every scoring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_rlm.data.chat import ChatFormat
    from lightning_rlm.models.base_model import resolve_model_path

    need_data("commonsenseqa/dev_rand_split.jsonl")
    path = resolve_model_path("lrlm:smollm2-135m-instruct")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    lines = []
    for chat in (None, ChatFormat()):
        task = CommonsenseQA(chat=chat)
        loglik = evaluate(task, model, tok, limit=20, seed=0, batch_size=4)
        letter = evaluate(task, model, tok, limit=20, seed=0, batch_size=10, scoring="letter")
        for key, value in [
            ("sum", loglik["accuracy_sum"]),
            ("mean", loglik["accuracy_mean"]),
            ("letter", letter["accuracy"]),
        ]:
            assert 0 <= value <= 1
            lines.append(f"{'chat' if chat else 'plain'} {key}: {value:.2f}")
        assert loglik["n"] == letter["n"] == 20
    with capsys.disabled():
        print("\nSmolLM2 CommonsenseQA (20 dev questions, chance 0.20): " + "; ".join(lines))
