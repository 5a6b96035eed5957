"""Prompts rendered through the tokenizer's chat template, as a chat model is meant to be prompted.

`ChatFormat` turns a text (a document's first tokens, a prefix, a question) into messages: an optional
system prompt and one user turn made from `user_template` (with `{text}`), rendered by the tokenizer's own
`apply_chat_template` with the generation prompt, then followed by an optional `assistant_prefix` that the
model continues (e.g. `"<think>\\n"` to open a reasoning block). For SmolLM2-135M-Instruct (ChatML):

    <|im_start|>system\\nYou are ...<|im_end|>\\n<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n

The template's special tokens are written as text and parsed back to their ids when the prompt is encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class ChatFormat:
    """How a prompt is put to a chat model.

    Args:
        system: the system message (None: none, so the template may insert its default one).
        user_template: the user message, with `{text}` where the prompt text goes.
        add_generation_prompt: end with the assistant turn's header, as for generation.
        assistant_prefix: text the assistant turn starts with (e.g. "<think>\\n").
    """

    system: Optional[str] = None
    user_template: str = "{text}"
    add_generation_prompt: bool = True
    assistant_prefix: str = ""

    def __post_init__(self) -> None:
        if "{text}" not in self.user_template:
            raise ValueError(f"chat.user_template must contain '{{text}}', got {self.user_template!r}")

    def messages(self, text: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*system, {"role": "user", "content": self.user_template.replace("{text}", text)}]

    def render(self, tokenizer: Any, text: str) -> str:
        """The prompt string for `text` under `tokenizer`'s chat template (a `TextTokenizer` or an HF one)."""
        hf = getattr(tokenizer, "hf", tokenizer)
        if not getattr(hf, "chat_template", None):
            name = getattr(hf, "name_or_path", None) or type(tokenizer).__name__
            raise ValueError(f"chat prompts need a tokenizer with a chat template; {name!r} has none "
                             "(use the chat model's own tokenizer, or drop `chat`)")
        rendered = hf.apply_chat_template(self.messages(text), tokenize=False,
                                          add_generation_prompt=self.add_generation_prompt)
        return rendered + self.assistant_prefix


# A method's hyperparameters may hold a ChatFormat: checkpoints must load with torch.load(weights_only=True),
# as Lightning does to read them back when resuming.
torch.serialization.add_safe_globals([ChatFormat])
