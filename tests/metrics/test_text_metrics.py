"""Text diversity/degeneracy metrics against small examples whose values were worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_rlm.metrics import (
    DegenerateFlag,
    DistinctN,
    GroupJaccard,
    MeanLength,
    RepeatedNgramLoop,
    UniqueFirstSentences,
    count_sentences,
    first_sentence,
)
from lightning_rlm.metrics.text import stable_hash

# compute() before update() is exercised on purpose (it returns NaN)
pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")


def test_group_jaccard_by_hand() -> None:
    m = GroupJaccard(group_size=2)
    # group 1: {the,cat,sat} vs {the,cat,ran}: 2 shared / 4 in union = 0.5; group 2: {a,b} vs {c,d}: 0
    m.update(["The cat sat", "the CAT ran", "a b", "c d"])
    assert m.compute().item() == pytest.approx(0.25)
    # a later group of two identical texts (similarity 1) -> mean of 0.5, 0, 1
    m.update(["same words", "Same  words"])
    assert m.compute().item() == pytest.approx(0.5)


def test_group_jaccard_group_of_three() -> None:
    m = GroupJaccard(group_size=3)
    # pairs: {a,b}-{a,c} = 1/3, {a,b}-{a,b} = 1, {a,c}-{a,b} = 1/3 -> mean 5/9
    m.update(["a b", "a c", "a b"])
    assert m.compute().item() == pytest.approx(5 / 9)


def test_group_jaccard_edge_cases() -> None:
    m = GroupJaccard(group_size=2)
    assert math.isnan(m.compute().item())
    m.update(["", ""])  # two empty sets count as identical
    assert m.compute().item() == 1.0
    with pytest.raises(ValueError):
        m.update(["one", "two", "three"])
    with pytest.raises(ValueError):
        GroupJaccard(group_size=1)
    ids = GroupJaccard(group_size=2)
    ids.update([[1, 2, 3], torch.tensor([3, 4])])  # token ids: {1,2,3} vs {3,4}: 1/4
    assert ids.compute().item() == pytest.approx(0.25)


def test_distinct_n_by_hand() -> None:
    m = DistinctN(n=2)
    # bigrams: "a b a b" -> ab, ba, ab; "a b c" -> ab, bc: 5 in total, 3 distinct (ab, ba, bc)
    m.update(["a b a b", "A B c"])
    assert m.compute().item() == pytest.approx(3 / 5)
    m.update(["x"])  # too short for a bigram: changes nothing
    assert m.compute().item() == pytest.approx(3 / 5)
    m.update(["b c d"])  # bc (seen), cd (new): 7 total, 4 distinct
    assert m.compute().item() == pytest.approx(4 / 7)

    uni = DistinctN(n=1)
    uni.update([[1, 2, 2], [2, 3]])  # ids: 5 unigrams, 3 distinct
    assert uni.compute().item() == pytest.approx(3 / 5)
    assert math.isnan(DistinctN(n=3).compute().item())


def test_distinct_n_does_not_cross_text_boundaries() -> None:
    m = DistinctN(n=2)
    m.update(["a", "b"])  # no bigram "a b" across the two texts
    assert math.isnan(m.compute().item())


def test_unique_first_sentences_by_hand() -> None:
    assert first_sentence("  Once upon a  TIME. There was") == "once upon a time"
    assert first_sentence("No terminator here") == "no terminator here"
    m = UniqueFirstSentences()
    m.update(["Once upon a time. There", "once  upon a TIME! x", "Hello world? yes"])
    m.update(["No terminator here", "Hello world."])
    # once upon a time, hello world, no terminator here
    assert m.compute().item() == 3


def test_repeated_ngram_loop_by_hand() -> None:
    m = RepeatedNgramLoop(n=2, min_repeats=3)
    # "a b a b a b": bigram (a, b) at positions 0, 2, 4 -> 3 times: a loop
    # "a b a b": (a, b) twice: no loop; "x": no bigrams: loop-free
    m.update(["a b a b a b", "a b a b", "x"])
    assert m.compute().item() == pytest.approx(2 / 3)
    assert m.has_loop("go go go go")  # overlapping occurrences count: (go, go) x 3
    assert not m.has_loop("go go go")


def test_repeated_ngram_loop_default_n4() -> None:
    m = RepeatedNgramLoop()  # n=4, min_repeats=3
    loop = "the cat sat down " * 3  # "the cat sat down" three times
    m.update([loop, "the cat sat down and then the cat sat down again", "word " * 6, "word " * 5])
    # loops: the 3x phrase and "word" x6 (its 4-gram occurs 3 times); "word" x5 has only 2 -> 2 of 4 free
    assert m.compute().item() == pytest.approx(0.5)


def test_mean_length_by_hand() -> None:
    m = MeanLength()
    m.update(["a b c", "d"])
    assert m.compute().item() == pytest.approx(2.0)
    ids = MeanLength()
    ids.update([[1, 2, 3, 4], torch.tensor([5, 6])])
    assert ids.compute().item() == pytest.approx(3.0)


def test_count_sentences() -> None:
    assert count_sentences("One. Two! Three? four") == 4  # trailing unterminated piece counts
    assert count_sentences("Wait... what?!") == 2
    assert count_sentences("...") == 0


def test_degenerate_flag_by_hand() -> None:
    good = DegenerateFlag()
    # 9 + 8 words (mean 8.5 >= 8), 3 sentences each, 15 bigrams all distinct (distinct-2 = 1.0)
    good.update(["The cat sat. The dog ran. A bird flew.", "It rained. We stayed in. Then we slept."])
    assert good.stats() == pytest.approx(
        {"mean_words": 8.5, "sentences_per_completion": 3.0, "distinct2": 1.0}
    )
    assert good.compute().item() == 0.0

    loop = DegenerateFlag(min_mean_words=1)
    # "a b." x5: 10 words, 5 sentences, 9 bigrams of which 2 distinct -> distinct-2 = 2/9 < 0.45
    loop.update(["a b. a b. a b. a b. a b."])
    assert loop.stats()["distinct2"] == pytest.approx(2 / 9)
    assert loop.compute().item() == 1.0

    short = DegenerateFlag()
    short.update(["Yes.", "No."])  # mean 1 word < 8
    assert short.compute().item() == 1.0

    one_sentence = DegenerateFlag()
    one_sentence.update(["one long sentence with ten different words and no stop"])  # 1 sentence < 3
    assert one_sentence.compute().item() == 1.0

    collapsed = DegenerateFlag()
    # the same good completion 4 times: 14 words, 5 sentences, but 13 distinct of 4 * 13 bigrams = 0.25
    collapsed.update(["The cat sat. The dog ran. A bird flew. It rained. We stayed in."] * 4)
    assert collapsed.stats() == pytest.approx(
        {"mean_words": 14.0, "sentences_per_completion": 5.0, "distinct2": 13 / 52}
    )
    assert collapsed.compute().item() == 1.0
    assert math.isnan(DegenerateFlag().compute().item())


def test_stable_hash_is_process_independent() -> None:
    # blake2b, not Python's salted hash(): this value is the same in every process and run
    assert stable_hash(("a", "b")) == stable_hash("a\x1fb")
    assert stable_hash("once upon a time") == stable_hash("once upon a time")
    assert -(2**63) <= stable_hash("x") < 2**63


def test_reset_clears_state() -> None:
    m = DistinctN()
    m.update(["a b c"])
    m.reset()
    m.update(["a b a b"])  # ab, ba, ab -> 2/3, nothing left over from before the reset
    assert m.compute().item() == pytest.approx(2 / 3)
