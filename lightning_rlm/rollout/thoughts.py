"""Thoughts as text: what the Quiet-STaR methods log and predict (markdown for TensorBoard's text tab).

* `thought_lines` (HF LMs, `QuietStar`) and `gru_thought_lines` (`QuietStarGRU`): for a few thinking
  positions of one window, ``context → ⟨t⟩thought⟨/t⟩ → prediction (true next token, its probability)``;
* `thinking_sample`: a thinking generation from a prompt, each token preceded by its thought as ⟨…⟩;
* `thinking_continuations`: thinking continuations of prompts with their thoughts, as `predict` writes them.

`show` decodes ids for markdown: newlines as ⏎ and backticks as ' (they would end the code span).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: rendering needs neither model module
    from lightning_rlm.models.quiet_star_gru import QuietStarOutput
    from lightning_rlm.models.quiet_star_lm import QuietStarLM, ThinkOutput

__all__ = ["gru_thought_lines", "show", "show_thought", "thinking_continuations", "thinking_sample", "thought_lines"]


def show(tokenizer: Any, ids: list[int]) -> str:
    """`tokenizer.decode(ids)` on one markdown line, inside a code span."""
    return tokenizer.decode(ids).replace("\n", "⏎").replace("`", "'")


def show_thought(tokenizer: Any, ids: list[int], vocab_size: int) -> str:
    """`show` of a thought's tokens up to its end: a variable-length thought (`QuietStarLM(variable_len=True)`)
    ends at the first id >= `vocab_size` (the end of thought)."""
    ends = [i for i, z in enumerate(ids) if z >= vocab_size]
    return show(tokenizer, ids[: ends[0]] if ends else ids)


@torch.no_grad()
def thought_lines(tokenizer: Any, batch: dict[str, Tensor], out: ThinkOutput, n: int,
                  context_tokens: int = 12) -> list[str]:
    """`context → ⟨thought⟩ → prediction (true, p base → p mixed)` for n thinking positions of row 0 of the
    batch `QuietStarLM.think` ran on (its real tokens only when the batch has an attention mask; none when
    row 0 is all padding). The thought and the mixed prediction are pass 0's; with add_last_context_token
    the re-fed last context token follows ⟨/t⟩."""
    ids, labels = batch["input_ids"][0], batch["labels"][0]  # [L]
    mask = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[0].bool()  # [L]
    positions = out.talk_index[:, 0].tolist()
    qs = [q for q, t in enumerate(positions) if bool(real[t])]
    if not qs:
        return []
    picks = [qs[i] for i in torch.linspace(0, len(qs) - 1, min(n, len(qs))).long().unique().tolist()]
    lines = []
    for q in picks:
        t = positions[q]
        true = int(labels[t])
        p_base = out.base_logits[0, t].float().softmax(-1)[true].item()
        mixed = out.talk_logits[0, q, 0].float().softmax(-1)  # [V] pass 0 of row 0
        thought = show_thought(tokenizer, out.thought_tokens[0, q].tolist(), out.base_logits.shape[-1])
        context = ids[: t + 1][real[: t + 1]][-context_tokens:]
        refed = f"`{show(tokenizer, [int(ids[t])])}`" if out.eot_logits is not None else ""  # add_last_context_token
        lines.append(f"`{show(tokenizer, context.tolist())}` → ⟨t⟩`{thought}`⟨/t⟩{refed}"
                     f" → **`{show(tokenizer, [int(mixed.argmax())])}`** (true `{show(tokenizer, [true])}`, "
                     f"p {p_base:.2f} → {mixed[true].item():.2f})")
    return lines


def gru_thought_lines(tokenizer: Any, input_ids: Tensor, labels: Tensor, out: QuietStarOutput, n: int = 4,
                      context_chars: int = 40) -> list[str]:
    """`context → ⟨thought⟩ → prediction (true next)` for n positions of one window input_ids, labels [T]
    (from T // 4 on), out: `QuietStarGRUNet` on that window alone (B = 1); the first thought of each."""
    T = input_ids.size(0)
    positions = torch.linspace(T // 4, T - 1, n).long().unique().tolist()
    lines = []
    for t in positions:
        ctx = show(tokenizer, input_ids[: t + 1].tolist())[-context_chars:]
        logp = out.logits[0, 0, t, 0].float().log_softmax(-1)  # [V], first thought
        pred = show(tokenizer, [int(logp.argmax())])
        true = int(labels[t])
        line = f"`{ctx}`"
        if out.thoughts is not None:
            th = out.thoughts
            length = int(th.lengths[0, t, 0])
            thought = show(tokenizer, th.tokens[0, t, 0, :length].tolist()) if length else ""
            end = "…" if bool(th.unfinished[0, t, 0]) else "⟨/t⟩"
            line += f" → ⟨t⟩`{thought}`{end}"
        line += f" → **`{pred}`** (true `{show(tokenizer, [true])}`, p={logp[true].exp().item():.2f})"
        lines.append(line)
    return lines


def thinking_sample(net: QuietStarLM, tokenizer: Any, prompt: str, max_new_tokens: int, n_ahead: int,
                    thought_temperature: float, device: torch.device) -> str:
    """A thinking generation from `prompt` (thoughts drawn from a generator seeded 0): the prompt in bold,
    then each token preceded by its thought as ⟨…⟩."""
    ids = torch.tensor([tokenizer.encode(prompt)], device=device)  # [1, T0]
    gen = torch.Generator(device).manual_seed(0)
    res = net.generate(ids, max_new_tokens=max_new_tokens, n_ahead=n_ahead, thought_temperature=thought_temperature,
                       generator=gen, return_thoughts=True)
    parts = [f"**{show(tokenizer, ids[0].tolist())}**"]
    V = net.lm.get_input_embeddings().weight.shape[0]
    for i, t in enumerate(res.tokens[0].tolist()):
        parts.append(f"⟨{show_thought(tokenizer, res.thoughts[0, i].tolist(), V)}⟩{show(tokenizer, [t])}")
    return "".join(parts)


def thinking_continuations(net: QuietStarLM, tokenizer: Any, prompt: Tensor, max_new_tokens: int, n_ahead: int,
                           thought_temperature: float, generator: torch.Generator) -> list[dict[str, Any]]:
    """Thinking continuations of the prompts [B, T0] (unpadded): per row {"prompt", "completion", "thoughts"
    (the thought before each completion token)}, decoded with `show`."""
    res = net.generate(prompt, max_new_tokens=max_new_tokens, n_ahead=n_ahead,
                       thought_temperature=thought_temperature, generator=generator, return_thoughts=True)
    V = net.lm.get_input_embeddings().weight.shape[0]
    return [{"prompt": show(tokenizer, p.tolist()), "completion": show(tokenizer, t.tolist()),
             "thoughts": [show_thought(tokenizer, z.tolist(), V) for z in zs]}
            for p, t, zs in zip(prompt, res.tokens, res.thoughts)]
