"""Prompts through a chat template: the exact rendered text, special tokens parsed to their ids."""

from __future__ import annotations

import json

import pytest

from lightning_rlm.data import ChatFormat, PrefixCompletionDataModule, PromptDataModule, TextSource

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture
def chat_tokenizer(tiny_llama_dir, tmp_path):
    """The tiny Llama's BPE with ChatML's special tokens and template (as SmolLM2's tokenizer has)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(tmp_path / "chat_tok")
    return str(tmp_path / "chat_tok"), tok


def test_prompts_are_rendered_as_a_user_turn(chat_tokenizer):
    path, tok = chat_tokenizer
    chat = ChatFormat(system="Be brief.", user_template="Continue: {text}", assistant_prefix="<think>\n")
    dm = PromptDataModule(prompts=["Once upon a time", "One day"], tokenizer=path, prompt_tokens=None, chat=chat)
    dm.setup()
    ex = next(e for e in [*dm.train_set.examples, *dm.val_set.examples] if "One day" in e["prompt"])
    assert ex["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nContinue: One day"
                            "<|im_end|>\n<|im_start|>assistant\n<think>\n")
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ex["prompt_ids"].count(start) == 3 and ex["prompt_ids"].count(end) == 2  # special ids, not pieces
    assert tok.decode(ex["prompt_ids"]) == ex["prompt"]


def test_prefix_completion_prompts_use_the_template_and_keep_the_completion(chat_tokenizer, shared_data):
    path, _ = chat_tokenizer
    dm = PrefixCompletionDataModule(TextSource(preset="tinystories", max_documents=30), tokenizer=path,
                                    completion_tokens=8, prefix_tokens=16, prompt_template="<prefix>{text}</prefix>",
                                    chat=ChatFormat(user_template="Continue the text.\n{text}"))
    dm.setup()
    ex = dm.train_set.examples[0]
    assert ex["prompt"] == (f"<|im_start|>user\nContinue the text.\n<prefix>{ex['prefix']}</prefix><|im_end|>\n"
                            "<|im_start|>assistant\n")
    assert len(ex["completion_ids"]) == 8 and ex["completion"] and ex["prompt_ids"] != ex["completion_ids"]


def test_a_tokenizer_without_a_chat_template_is_a_clear_error(tiny_llama_dir):
    dm = PromptDataModule(prompts=["a", "b"], tokenizer=str(tiny_llama_dir), prompt_tokens=None, chat=ChatFormat())
    with pytest.raises(ValueError, match="chat prompts need a tokenizer with a chat template"):
        dm.setup()
    with pytest.raises(ValueError, match="must contain"):
        ChatFormat(user_template="no slot")


def test_cut_prompts_are_counted(tiny_llama_dir, tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in
                                                ["one two three four five six seven", "a b c d e f g h i j"] * 5))
    dm = PromptDataModule(TextSource(path=str(tmp_path / "p.jsonl")), tokenizer=str(tiny_llama_dir), prompt_tokens=3)
    dm.setup()
    assert dm.cut == 10 and all(len(e["prompt_ids"]) == 3 for e in dm.train_set.examples)
