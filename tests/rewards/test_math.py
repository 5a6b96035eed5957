"""GSM8K rewards by hand, and the reference answer arriving as a keyword list from the jsonl rows."""

from __future__ import annotations

import pytest

from lightning_rlm.rewards import GSM8KCorrect, GSM8KFormat, WeightedSum, load_reward


def test_correctness_by_hand():
    completions = [
        "9 eggs * $2 = $18.\n#### 18",  # right, GSM8K format
        "The answer is 18.",  # right, prose
        "#### 18.00",  # right, decimals
        "#### 17",  # wrong
        "I cannot tell.",  # missing
        "#### 1,000",  # right, with a comma
    ]
    refs = ["She makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18", 18, "#### 18", "#### 18", "#### 1000"]
    assert GSM8KCorrect()(["p"] * 6, completions, answer=refs) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_answer_field_and_errors():
    reward = GSM8KCorrect(answer_field="target")
    assert reward(["p"], ["#### 3"], target=["3"], tokenizer=object()) == [1.0]
    with pytest.raises(ValueError, match="no 'target' field"):
        reward(["p"], ["#### 3"], answer=["3"])
    with pytest.raises(ValueError, match="2 references for 1"):
        reward(["p"], ["#### 3"], target=["3", "4"])
    assert load_reward("GSM8KCorrect", answer_field="target").name == "gsm8k_correct"


def test_format_by_hand():
    completions = ["Work.\n#### 42", "#### 42 apples", "the answer is 42", "####\n42", "  #### -3.5.", ""]
    assert GSM8KFormat()(["p"] * 6, completions) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert GSM8KFormat(marker="Answer:")(["p"], ["Answer: 7"]) == [1.0]


def test_weighted_with_format():
    reward = WeightedSum([GSM8KCorrect(), GSM8KFormat()], weights=[1.0, 0.1])
    assert reward(["p", "p"], ["#### 5", "5"], answer=["5", "5"]) == pytest.approx([1.1, 1.0])
