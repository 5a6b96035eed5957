"""GSM8K: final-number extraction on hand-written cases, and the task read from the real files."""

from __future__ import annotations

import pytest

from lightning_rlm.tasks import GSM8K, extract_answer, normalize_number

CASES = [
    # GSM8K's own format, with the calculator annotations of the reference answers
    (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18",
        "18",
    ),
    ("#### 1,000", "1000"),
    ("#### $3.50", "3.5"),
    ("#### -4", "-4"),
    ("####72", "72"),
    ("first try #### 5, no wait\n#### 6", "6"),  # the last marker counts
    ("#### 12\nThen I added 3 more for fun.", "12"),  # text after the marker is ignored
    # "the answer is", case-insensitive, first number after its last occurrence
    ("So the answer is $1,250.00.", "1250"),
    ("The answer is: 7 apples and 3 pears.", "7"),
    ("My first answer is 4. After checking, the final answer is 5.", "5"),
    ("Answer: 0.50", "0.5"),
    (r"The result is \boxed{42}.", "42"),
    (r"\boxed{1,024} and later 7", "1024"),
    # the last number
    ("3 + 4 = 7.", "7"),
    ("She has 12 apples and gives away 5, leaving 7", "7"),
    ("It costs $20.", "20"),
    ("The temperature dropped to -3 degrees", "-3"),
    ("16-3 = 13", "13"),  # a minus between numbers is not a sign
    ("The price is 2.0 dollars", "2"),
    ("about 50% of them, so 50", "50"),
    ("1, 2, 3", "3"),  # a list is not a thousands number
    # missing or unparseable
    ("I don't know.", None),
    ("", None),
    ("#### ", None),
    ("#### seven", None),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_wrong_answers_do_not_match():
    assert extract_answer("so 9 * 2 = 18\n#### 17") != "18"
    assert extract_answer("#### 18.5") != "18"
    assert extract_answer("#### 1,000") == extract_answer("1000.00") == normalize_number("$1,000")


def test_gsm8k_reads_the_real_files(need_data):
    need_data("gsm8k/test.jsonl")
    need_data("gsm8k/train.jsonl")
    task = GSM8K(num_fewshot=2)
    examples = task.examples()
    assert len(examples) == 1319 and examples[0].gold == "18" and "Janet" in examples[0].question
    assert all(ex.gold is not None for ex in examples)  # every reference answer has a number
    prompt = task.prompt(examples[0], tokenizer=None)
    assert prompt.count("Question:") == 3 and prompt.count("####") == 2 and "<<" not in prompt
    assert prompt.endswith(f"Question: {examples[0].question}\nAnswer:")
    assert task.prompt(examples[1], None).startswith(prompt.split("Question: Janet")[0])  # same shots for all
    assert GSM8K(num_fewshot=2, fewshot_seed=1).prompt(examples[0], None) != prompt


def test_bad_rows_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 3"}\n{"question": "q2", "answer": "none"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no number"):
        GSM8K(path=str(path)).examples()
    path.write_text('{"q": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no field 'question'"):
        GSM8K(path=str(path)).examples()
