"""GAN-RL's two prompts: the generator's (continue a document's prefix, after a ``<think>`` block) and the
reasoning discriminator's (judge a prefix's continuation real or generated, after its own ``<think>`` block).

Each is a template with ``{text}`` where the text goes, or a :class:`~lightning_rlm.data.chat.ChatFormat`
rendered through the tokenizer's own chat template instead. The generator's ``{text}`` is the prefix; the
discriminator's is :func:`judged_text` (``<prefix>…</prefix>`` then ``<continuation>…</continuation>``). The
discriminator answers with one token, the first of " real" or of " generated" (:func:`answer_token_ids`).
"""

from __future__ import annotations

from typing import Any, Optional

from lightning_rlm.data.chat import ChatFormat

__all__ = [
    "D_PROMPT_TEMPLATE",
    "PLAIN_D_PROMPT_TEMPLATE",
    "PLAIN_PROMPT_TEMPLATE",
    "SEED_PROMPT_TEMPLATE",
    "answer_token_ids",
    "judged_text",
    "render_prompt",
]

# The seed's prompt, verbatim (Qwen chat markers as written in the note; `{text}` is the prefix).
SEED_PROMPT_TEMPLATE = (
    "<|im_start|>system\n"
    "You act as a causal model of language.\n"
    "Example:\n"
    '"""\n'
    "user:\n"
    "<prefix>\n"
    "The user will present a prefix they wish for you to continue, \n"
    "then you'll start at the last few words\n"
    "</prefix>\n"
    "assistant:\n"
    "...last few words, then continuation starts, \n"
    "and you just keep generating, without any other commentary.\n"
    '"""\n'
    "<|im_start|>user\n"
    "<prefix>\n"
    "{text}\n"
    "</prefix>\n"
    "<|im_start|>assistant\n"
    "<think>\n"
)
# A short template for tiny models that have never seen a chat format.
PLAIN_PROMPT_TEMPLATE = "<prefix>\n{text}\n</prefix>\n<think>\n"
# The reasoning discriminator's prompt (ours: the seed does not give it), in the seed's hand-written ChatML;
# `{text}` is "<prefix>\n{prefix}\n</prefix>\n<continuation>\n{completion}\n</continuation>".
D_PROMPT_TEMPLATE = (
    "<|im_start|>system\n"
    "You judge continuations of text. You are shown a prefix of a document and a continuation, which is either "
    "the document's real continuation or one written by a language model. Think it over, then answer real or "
    "generated.\n"
    "<|im_start|>user\n"
    "{text}\n"
    "Is the continuation real or generated?\n"
    "<|im_start|>assistant\n"
    "<think>\n"
)
PLAIN_D_PROMPT_TEMPLATE = "{text}\nreal or generated?\n<think>\n"


def judged_text(prefix: str, completion: str) -> str:
    """The reasoning discriminator's ``{text}`` for one (prefix, completion)."""
    return f"<prefix>\n{prefix}\n</prefix>\n<continuation>\n{completion}\n</continuation>"


def render_prompt(tokenizer: Any, text: str, template: str,
                  chat: Optional[ChatFormat | dict[str, Any]] = None) -> str:
    """``text`` in ``template`` (at ``{text}``), or through ``tokenizer``'s chat template when ``chat`` is given
    (a dict is a ChatFormat's fields, as hparams read back from a checkpoint hold it)."""
    if isinstance(chat, dict):
        chat = ChatFormat(**chat)
    if chat is not None:
        return chat.render(tokenizer, text)
    return template.replace("{text}", text)


def answer_token_ids(tokenizer: Any, answers: tuple[str, str]) -> list[int]:
    """The first token of each of the two answers (real, generated), which must differ."""
    firsts = [tokenizer.encode(a, add_special_tokens=False)[:1] for a in answers]  # [real, generated]
    if len(firsts) != 2 or not all(firsts) or firsts[0] == firsts[1]:
        raise ValueError(f"d_answers {answers!r} must be two answers that start with two different "
                         f"tokens, got first tokens {firsts}")
    return [f[0] for f in firsts]
