import pytest
import torch

from lightning_rlm.data import LMWindowDataModule, PrefixCompletionDataModule, PromptDataModule, TextSource


def test_lm_windows_are_contiguous_and_shifted(shared_data):
    dm = LMWindowDataModule(TextSource(preset="shakespeare"), block_size=32, batch_size=4)
    dm.setup("fit")
    text = dm.train_docs[0]
    ex = dm.train_set[3]
    assert ex["input_ids"].shape == (32,) and torch.equal(ex["input_ids"][1:], ex["labels"][:-1])
    assert dm.tokenizer.decode(ex["input_ids"]) == text[3 * 32 : 4 * 32]
    # the split is the tail of the single corpus
    full = TextSource(preset="shakespeare").read()[0]
    assert dm.train_docs[0] + dm.val_docs[0] == full
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)


def test_split_by_document_is_deterministic_by_seed(shared_data, gpt2_tokenizer_file):
    a = LMWindowDataModule(TextSource(preset="tinystories"), tokenizer="gpt2", seed=1)
    b = LMWindowDataModule(TextSource(preset="tinystories"), tokenizer="gpt2", seed=1)
    c = LMWindowDataModule(TextSource(preset="tinystories"), tokenizer="gpt2", seed=2)
    for dm in (a, b, c):
        dm.load_documents()
    assert a.val_docs == b.val_docs and a.val_docs != c.val_docs
    n = len(TextSource(preset="tinystories").read())
    assert len(a.train_docs) + len(a.val_docs) == n and len(a.val_docs) == round(0.1 * n)


def test_block_size_larger_than_every_document(shared_data, gpt2_tokenizer_file, pile_file):
    dm = LMWindowDataModule(TextSource(preset="pile", max_documents=30), tokenizer="gpt2", block_size=100_000,
                            cross_documents=False)
    with pytest.raises(ValueError, match=r"block_size=100000 is larger than every train document"):
        dm.setup("fit")


def test_block_size_larger_than_the_split(shared_data):
    dm = LMWindowDataModule(TextSource(preset="shakespeare"), block_size=10_000_000)
    with pytest.raises(ValueError, match="block_size=10000000 is larger than the whole train split"):
        dm.setup("fit")


def test_missing_data_file_fails_at_construction():
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        LMWindowDataModule(TextSource(path="missing.txt"))


def test_unknown_tokenizer_fails_at_construction(shared_data):
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe2'"):
        LMWindowDataModule(TextSource(preset="shakespeare"), tokenizer="bpe2")


def test_prefix_completion_windows_are_exact(shared_data, gpt2_tokenizer_file, pile_file):
    dm = PrefixCompletionDataModule(TextSource(preset="pile", max_documents=60), tokenizer="gpt2",
                                    completion_tokens=16, prefix_tokens=40, batch_size=3)
    dm.setup("fit")
    tok = dm.tokenizer
    train_ids = [tok.encode(d) for d in dm.train_docs]
    for ex in list(dm.train_set)[:10]:
        assert len(ex["completion_ids"]) == 16 and 1 <= len(ex["prompt_ids"]) <= 40
        window = ex["prompt_ids"] + ex["completion_ids"]
        # the window is a contiguous slice of one source document, the completion is its last 16 tokens
        assert any(_contains(ids, window) for ids in train_ids)
        assert ex["completion"] == tok.decode(ex["completion_ids"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt_ids"].shape[0] == 3 and batch["completion_ids"].shape == (3, 16)
    assert batch["prompt_mask"][:, -1].all()  # left padded: prompts end at the last column


def test_prefix_completion_drops_short_documents(tmp_path, gpt2_tokenizer_file):
    docs = ["a b c", "word " * 40, "x y", "word " * 100]
    (tmp_path / "d.txt").write_text("\n\n".join(docs))
    dm = PrefixCompletionDataModule(TextSource(path=str(tmp_path / "d.txt"), separator="\n\n"),
                                    tokenizer="gpt2", completion_tokens=10)
    dm.load_documents()
    dm.dropped = {}
    examples = dm._examples(docs, "train", 0)
    assert len(examples) == 2 and dm.dropped["train"] == 2
    with pytest.raises(ValueError, match="at most 2 x completion_tokens=10"):
        dm._examples(docs[::2], "val", 1)


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_prefix_completion_template(shared_data, gpt2_tokenizer_file):
    dm = PrefixCompletionDataModule(TextSource(preset="tinystories", max_documents=40), tokenizer="gpt2",
                                    completion_tokens=8, prompt_template="<prefix>\n{text}\n</prefix>")
    dm.setup("fit")
    ex = dm.train_set[0]
    assert ex["prompt"] == f"<prefix>\n{ex['prefix']}\n</prefix>"
    with pytest.raises(ValueError, match="must contain"):
        PrefixCompletionDataModule(TextSource(preset="tinystories"), prompt_template="no slot")


def test_prompts_first_k_tokens_and_extra_fields(tmp_path, gpt2_tokenizer_file):
    rows = ['{"text": "Once upon a time there was a cat who liked milk.", "eligible": true}',
            '{"text": "One day a dog ran to the park and found a ball.", "eligible": false}',
            '{"text": "Tiny.", "eligible": true}']
    (tmp_path / "p.jsonl").write_text("\n".join(rows))
    dm = PromptDataModule(TextSource(path=str(tmp_path / "p.jsonl")), tokenizer="gpt2", prompt_tokens=4,
                          val_fraction=0.34, seed=3, batch_size=1)
    dm.setup("fit")
    everything = list(dm.train_set) + list(dm.val_set)
    assert len(everything) == 2  # "Tiny." has fewer than 4 tokens
    for ex in everything:
        assert len(ex["prompt_ids"]) == 4 and "eligible" in ex
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt_ids"].shape == (1, 4) and isinstance(batch["eligible"], list)


def test_fixed_prompt_list(shared_data, gpt2_tokenizer_file):
    dm = PromptDataModule(prompts=["Once upon a time", "One day"], tokenizer="gpt2", prompt_tokens=None)
    dm.setup("fit")
    assert {dm.train_set[0]["prompt"], dm.val_set[0]["prompt"]} == {"Once upon a time", "One day"}
