"""Tests for the rule-based text rewards, against hand-computed values."""

from __future__ import annotations

import doctest
from pathlib import Path
from typing import Any

import pytest

import lightning_rlm.rewards.text as text_module
from lightning_rlm.rewards import (
    KeywordCount,
    SentenceLength,
    WeightedSum,
    load_reward,
    reward_name,
    split_sentences,
)

TEN_WORDS = "one two three four five six seven eight nine ten."
EIGHT_WORDS = "one two three four five six seven eight!"


@pytest.fixture(scope="module")
def gpt2_tokenizer(gpt2_tokenizer_file: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(gpt2_tokenizer_file))


def test_doctests_pass() -> None:
    result = doctest.testmod(text_module)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello world.", ["Hello world."]),
        ("Wait... what?! Yes", ["Wait...", "what?!", "Yes"]),
        ("  no terminator here  ", ["no terminator here"]),
        ("A.B. C", ["A.", "B.", "C"]),
        ("", []),
        ("!!! ... ?", []),
        ("Line one.\nLine two.", ["Line one.", "Line two."]),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_sentence_length_words_smooth_and_exact() -> None:
    completions = [
        f"{TEN_WORDS} {EIGHT_WORDS}",  # 10 -> 1.0, 8 -> 1 - 0.2*2 = 0.6
        TEN_WORDS,  # 1.0
        "one two three four five six seven eight nine ten eleven",  # unterminated, 11 -> 0.8
        "a b. c d e f g h i j k l m n o p q r",  # 2 -> max(0, 1 - 1.6) = 0, 16 -> max(0, 1 - 1.2) = 0
        "",  # no sentences -> 0
    ]
    prompts = ["p"] * len(completions)
    smooth = SentenceLength(10, mode="smooth", unit="words")(prompts, completions)
    assert smooth == pytest.approx([0.8, 1.0, 0.8, 0.0, 0.0])
    exact = SentenceLength(10, mode="exact", unit="words")(prompts, completions)
    assert exact == [0.5, 1.0, 0.0, 0.0, 0.0]


def test_sentence_length_custom_slope() -> None:
    reward = SentenceLength(4, unit="words", smooth_slope=0.5)
    # 3 words -> 0.5; 6 words -> 0.0; 4 words -> 1.0; mean = 0.5
    assert reward(["p"], ["a b c. a b c d e f. a b c d"]) == pytest.approx([0.5])


def test_sentence_length_names() -> None:
    assert SentenceLength().name == "sentence_length_10_smooth"
    assert SentenceLength(12, mode="exact").name == "sentence_length_12_exact"
    assert SentenceLength(10, unit="words").name == "sentence_length_10_smooth_words"


def test_sentence_length_tokens(gpt2_tokenizer: Any) -> None:
    # GPT-2 tokens: "The", " cat", " sat", " on", " the", " mat", "." -> 7 ; "Hello", " world", "!" -> 3
    assert gpt2_tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"] == [
        464, 3797, 3332, 319, 262, 2603, 13,
    ]  # fmt: skip
    completion = "The cat sat on the mat. Hello world!"
    exact7 = SentenceLength(7, mode="exact", unit="tokens")(["p"], [completion], tokenizer=gpt2_tokenizer)
    assert exact7 == [0.5]
    smooth = SentenceLength(7, unit="tokens")(["p", "p"], [completion, ""], tokenizer=gpt2_tokenizer)
    # 7 -> 1.0 ; 3 -> 1 - 0.2*4 = 0.2 ; mean 0.6 ; empty completion -> 0
    assert smooth == pytest.approx([0.6, 0.0])


def test_sentence_length_tokens_needs_tokenizer() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        SentenceLength(10, unit="tokens")(["p"], ["Some text."])


def test_sentence_length_bad_args() -> None:
    with pytest.raises(ValueError, match="mode"):
        SentenceLength(mode="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unit"):
        SentenceLength(unit="chars")  # type: ignore[arg-type]


def test_keyword_count_word_boundaries() -> None:
    reward = KeywordCount()
    assert reward.name == "happy_count"
    completions = ["happy, Happy! unhappy", "happyness happy_dog", "HAPPY happy-go-lucky", ""]
    assert reward(["p"] * 4, completions) == [2.0, 0.0, 2.0, 0.0]


def test_keyword_count_case_sensitive_and_cap() -> None:
    assert KeywordCount(case_sensitive=True)(["p"], ["happy Happy happy"]) == [2.0]
    assert KeywordCount(max_count=2)(["p", "p"], ["happy " * 5, "happy"]) == [2.0, 1.0]
    assert KeywordCount("joy").name == "joy_count"


def test_weighted_sum() -> None:
    reward = WeightedSum(
        [SentenceLength(10, unit="words"), KeywordCount()], weights=[2.0, -0.5], name="combo"
    )
    assert reward.name == "combo"
    completions = [f"{TEN_WORDS} {EIGHT_WORDS}", "happy happy happy"]
    # 2 * 0.8 - 0.5 * 0 = 1.6 ; 2 * max(0, 1 - 0.2*7) - 0.5 * 3 = -1.5
    assert reward(["p", "p"], completions) == pytest.approx([1.6, -1.5])
    assert WeightedSum([KeywordCount(), KeywordCount()])(["p"], ["happy"]) == [2.0]
    assert WeightedSum([KeywordCount()]).name == "weighted_sum"


def test_weighted_sum_validates_lengths() -> None:
    with pytest.raises(ValueError, match="2 rewards but 1 weights"):
        WeightedSum([KeywordCount(), KeywordCount()], weights=[1.0])

    def bad(prompts: list[str], completions: list[str], **fields: object) -> list[float]:
        return [0.0]

    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        WeightedSum([bad])(["p", "p"], ["a", "b"])


def test_weighted_sum_accepts_class_paths() -> None:
    reward = WeightedSum(["lightning_rlm.rewards.KeywordCount"])
    assert reward(["p"], ["happy"]) == [1.0]


def test_rewards_ignore_extra_fields(gpt2_tokenizer: Any) -> None:
    fields = {"tokenizer": gpt2_tokenizer, "answer": ["x"], "level": [3]}
    assert KeywordCount()(["p"], ["happy"], **fields) == [1.0]
    assert SentenceLength(3, mode="exact")(["p"], ["Hello world!"], **fields) == [1.0]


def test_load_reward_by_path() -> None:
    reward = load_reward("lightning_rlm.rewards.text.SentenceLength", n=5, mode="exact", unit="words")
    assert isinstance(reward, SentenceLength)
    assert reward(["p"], ["a b c d e."]) == [1.0]
    assert isinstance(
        load_reward("KeywordCount"), KeywordCount
    )  # bare names resolve in lightning_rlm.rewards
    fn = load_reward("lightning_rlm.rewards.text.split_sentences")
    assert fn is split_sentences
    assert load_reward(KeywordCount, word="sad").name == "sad_count"


def test_load_reward_function_with_init_args() -> None:
    def length_reward(
        prompts: list[str], completions: list[str], scale: float = 1.0, **kw: object
    ) -> list[float]:
        return [scale * len(c) for c in completions]

    reward = load_reward(length_reward, scale=2.0)
    assert reward(["p"], ["abc"]) == [6.0]
    assert reward_name(reward) == "length_reward"


@pytest.mark.parametrize(
    "path",
    ["not_a_package_xyz.mod.fn", "lightning_rlm.rewards.text.NoSuchReward", "nodots_nosuchname", "a..b"],
)
def test_load_reward_bad_path(path: str) -> None:
    with pytest.raises(ValueError, match="cannot import reward"):
        load_reward(path)


def test_load_reward_non_callable() -> None:
    with pytest.raises(ValueError, match="non-callable"):
        load_reward("lightning_rlm.rewards.text._TERMINATORS_AND_SPACE")
