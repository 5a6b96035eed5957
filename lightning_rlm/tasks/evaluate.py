"""Run a task on a causal LM: batched greedy generation or batched choice log-likelihoods, sharded over ranks.

`evaluate(task, model, tokenizer, ...)`:

1. picks the examples: all of them, or (with `limit`) a fixed subset drawn with `random.Random(seed)` and
   kept in file order, so every call (and every rank count) sees the same examples;
2. under `torch.distributed` (when initialised) scores only this rank's shard `subset[rank::world]`;
3. scores the shard:
   * generation tasks and letter scoring: prompts are encoded, sorted by length, left-padded (`pad_left`) in
     batches of `batch_size` and decoded greedily by the model's own `generate` (`do_sample=False`,
     `pad_token_id`), stopping at EOS and at the chat template's end-of-turn token (`<|im_end|>` and the
     like, when the tokenizer has one); the completion is cut at the task's stop strings and graded;
   * log-likelihood scoring, `batch_size` examples at a time: the contexts run once, left-padded with an
     attention mask and mask-derived position ids, keeping their KV cache and last logits; the cache rows
     are repeated per choice and the right-padded continuations run on top of them (positions continuing
     each context's), and `log_softmax(logits).gather(next ids)` summed over a continuation is its
     log-likelihood. Without a selectable cache (or `share_context=False`) every (context, choice) pair is
     one left-padded row whose continuation sits in the last columns, so only those logits are kept
     (`logits_to_keep`);
4. sums the counts over ranks with `all_reduce` (and gathers the per-example records with
   `all_gather_object`), so 1 and N processes give the same accuracy and records on the same examples.

The model is put in eval mode under `torch.no_grad` and its training flag restored afterwards.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_rlm.data.collate import pad_left, pad_right
from lightning_rlm.models.hf import stop_token_ids as hf_stop_token_ids
from lightning_rlm.rollout.generate import position_ids_from_mask
from lightning_rlm.tasks.base import Example, GenerationTask, Task
from lightning_rlm.tasks.multiple_choice import MultipleChoiceTask


def select_indices(n: int, limit: Optional[int], seed: int) -> list[int]:
    """All of `range(n)`, or `limit` of them drawn with `seed`, in increasing order.

    >>> select_indices(10, 3, seed=0) == select_indices(10, 3, seed=0), select_indices(4, None, 0)
    (True, [0, 1, 2, 3])
    """
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    return sorted(random.Random(seed).sample(range(n), limit))


def _hf(tokenizer: Any) -> Any:
    return getattr(tokenizer, "hf", tokenizer)  # a lightning_rlm TextTokenizer or an HF tokenizer


def stop_token_ids(tokenizer: Any, model: Optional[nn.Module] = None) -> list[int]:
    """EOS, the model's generation-config EOS ids and the chat template's end-of-turn token, as a list
    (:func:`lightning_rlm.models.hf.stop_token_ids`, which the RL methods' sampling uses too)."""
    hf = _hf(tokenizer)
    if hf.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; generation would never stop")
    ids = hf_stop_token_ids(hf, getattr(model, "generation_config", None))
    return [ids] if isinstance(ids, int) else ids


def _pad_id(tokenizer: Any) -> int:
    hf = _hf(tokenizer)
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(_hf(tokenizer).encode(text, add_special_tokens=special))


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> list[str]:
    """Greedy completions of `prompts` (in their order), batched left-padded through `model.generate`; each is
    decoded up to its first stop token (EOS or end of turn), special tokens skipped."""
    from transformers import GenerationConfig

    if not prompts:
        return []
    hf = _hf(tokenizer)
    device = _device(model)
    eos = stop_token_ids(tokenizer, model)
    pad = _pad_id(tokenizer)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos,
        pad_token_id=pad,
        num_return_sequences=1,
    )
    encoded = [_encode(tokenizer, p, add_special_tokens) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = pad_left([encoded[i] for i in rows], pad)  # [B, P]
        sequences = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
        )  # [B, P + C]
        completions = sequences[:, ids.shape[1] :].tolist()  # [B, C]
        for i, completion in zip(rows, completions):
            cut = next((t for t, tok in enumerate(completion) if tok in eos), len(completion))
            out[i] = hf.decode(completion[:cut], skip_special_tokens=True)
    return out


def encode_pair(
    tokenizer: Any, context: str, continuation: str, add_special_tokens: bool = True
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the continuation's ids are those of `context + continuation` after the
    context's own encoding (lm-eval-harness's split); when the context's encoding is not a prefix of the whole
    one, the two are encoded separately."""
    ctx = _encode(tokenizer, context, add_special_tokens)
    whole = _encode(tokenizer, context + continuation, add_special_tokens)
    cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else _encode(tokenizer, continuation, False)
    if not ctx or not cont:
        raise ValueError(
            f"empty context or continuation after tokenization: {context[-40:]!r} + {continuation!r}"
        )
    return ctx, cont


def _logits_last(model: nn.Module, ids: Tensor, mask: Tensor, keep: int) -> Tensor:
    """Logits of the last `keep` columns of a left-padded batch. [B, T] -> [B, keep, V]."""
    kwargs: dict[str, Any] = dict(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
    )
    try:
        logits = model(**kwargs, use_cache=False, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep / use_cache
        logits = model(**kwargs).logits
    return logits[:, -keep:]


@torch.no_grad()
def choice_logliks(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, Sequence[str]]],
    batch_size: int = 8,
    add_special_tokens: bool = True,
    share_context: bool = True,
) -> list[list[tuple[float, int]]]:
    """For each (context, continuations) pair: [(sum of the continuation's token log-probs, its token count)]
    per continuation. `batch_size` contexts (all their continuations) go through one forward.

    With `share_context`, each batch's contexts go through the model once (left-padded, KV cache kept), the
    cache rows are repeated for every continuation and only the continuations run on top of it, so a
    five-way question costs one context pass instead of five; models without a selectable KV cache fall
    back to one full (context + continuation) row per choice, which `share_context=False` forces.
    """
    encoded = []  # (context ids, [continuation ids]): the context's ids are the same for every choice
    for context, continuations in pairs:
        cells = [encode_pair(tokenizer, context, c, add_special_tokens) for c in continuations]
        encoded.append((cells[0][0] if cells else [], [cont for _, cont in cells]))
    if share_context:
        try:
            return _logliks_shared(model, tokenizer, encoded, batch_size)
        except (TypeError, AttributeError, NotImplementedError):
            pass  # no usable KV cache: score full rows
    return _logliks_full(model, tokenizer, encoded, batch_size)


def _logliks_full(
    model: nn.Module, tokenizer: Any, encoded: list[tuple[list[int], list[list[int]]]], batch_size: int
) -> list[list[tuple[float, int]]]:
    """One left-padded row per (context + continuation); the continuations end in the last columns."""
    device = _device(model)
    pad = _pad_id(tokenizer)
    rows = [
        (p, c, ctx + cont, len(cont))
        for p, (ctx, conts) in enumerate(encoded)
        for c, cont in enumerate(conts)
    ]
    per_batch = max(1, batch_size * max((len(conts) for _, conts in encoded), default=1))
    rows.sort(key=lambda r: -len(r[2]))
    out: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(conts) for _, conts in encoded]
    for start in range(0, len(rows), per_batch):
        batch = rows[start : start + per_batch]
        ids, mask = pad_left([r[2] for r in batch], pad)  # [B, T]
        ids, mask = ids.to(device), mask.to(device)
        width = max(r[3] for r in batch)  # the longest continuation, W
        logits = _logits_last(model, ids, mask, width + 1)[:, :-1]  # [B, W, V] predict the last W ids
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, W, V]
        targets = ids[:, -width:]  # [B, W]
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, W]
        lengths = torch.tensor([r[3] for r in batch], device=device)  # [B]
        cols = torch.arange(width, device=device)  # [W]
        in_cont = cols[None, :] >= (width - lengths)[:, None]  # [B, W] the row's own continuation
        sums = (token_lp * in_cont).sum(dim=1).tolist()  # [B]
        for (p, c, _, n), s in zip(batch, sums):
            out[p][c] = (float(s), n)
    return out


def _cache_arg(model: nn.Module) -> str:
    """The forward's KV-cache argument: `cache` (transformers >= 5.2x) or `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper's model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _logliks_shared(
    model: nn.Module, tokenizer: Any, encoded: list[tuple[list[int], list[list[int]]]], batch_size: int
) -> list[list[tuple[float, int]]]:
    """Contexts once with a KV cache, then every continuation (right-padded) on its context's cache rows."""
    device = _device(model)
    pad = _pad_id(tokenizer)
    order = sorted(range(len(encoded)), key=lambda p: -len(encoded[p][0]))
    out: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(conts) for _, conts in encoded]
    for start in range(0, len(order), batch_size):
        batch = [p for p in order[start : start + batch_size] if encoded[p][1]]
        if not batch:
            continue
        ids, mask = pad_left([encoded[p][0] for p in batch], pad)  # [B, P]
        ids, mask = ids.to(device), mask.to(device)
        first = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=True,
            logits_to_keep=1,
        )
        first_lp = torch.log_softmax(first.logits[:, -1].float(), dim=-1)  # [B, V] predicts each first token
        cache = getattr(first, "cache", None)
        cache = cache if cache is not None else first.past_key_values
        owner = torch.tensor([b for b, p in enumerate(batch) for _ in encoded[p][1]], device=device)  # [R]
        cache.batch_select_indices(owner)  # [B, ...] -> [R, ...] cache rows, one per continuation
        conts = [cont for p in batch for cont in encoded[p][1]]
        cont_ids, cont_mask = pad_right(conts, pad)  # [R, L]
        cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
        width = cont_ids.shape[1]
        attn = torch.cat([mask[owner], cont_mask], dim=1)  # [R, P+L]
        positions = mask.sum(dim=1)[owner][:, None] + torch.arange(width, device=device)  # [R, L]
        logits = model(
            input_ids=cont_ids,
            attention_mask=attn,
            position_ids=positions,
            use_cache=True,
            **{_cache_arg(model): cache},
        ).logits  # [R, L, V]
        token_lp = torch.empty(cont_ids.shape, dtype=torch.float32, device=device)  # [R, L]
        token_lp[:, 0] = first_lp[owner].gather(-1, cont_ids[:, :1]).squeeze(-1)
        if width > 1:
            rest = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [R, L-1, V]
            token_lp[:, 1:] = rest.gather(-1, cont_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        sums = (token_lp * cont_mask).sum(dim=1).tolist()  # [R]
        lengths = cont_mask.sum(dim=1).tolist()  # [R]
        rows = [(p, c) for p in batch for c in range(len(encoded[p][1]))]
        for (p, c), s, n in zip(rows, sums, lengths):
            out[p][c] = (float(s), int(n))
    return out


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce_counts(counts: list[float], device: torch.device) -> list[float]:
    rank, world = _dist()
    if world == 1:
        return counts
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(counts, dtype=torch.float64, device=where)  # [K]
    dist.all_reduce(t)
    return t.tolist()


def _gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rank, world = _dist()
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["index"])


def _grade_generation(
    task: GenerationTask, examples: list[Example], completions: list[str]
) -> list[dict[str, Any]]:
    records = []
    for ex, completion in zip(examples, completions):
        completion = task.cut(completion)
        pred = task.extract(completion)
        records.append(
            dict(
                index=ex.index,
                question=ex.question,
                completion=completion,
                prediction=pred,
                gold=ex.gold,
                correct=task.is_correct(pred, ex),
            )
        )
    return records


def evaluate(
    task: Task,
    model: nn.Module,
    tokenizer: Any,
    limit: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: Optional[int] = None,
    scoring: Optional[str] = None,
    share_context: bool = True,
) -> dict[str, Any]:
    """Score `model` on `task` (see the module docstring).

    Args:
        task: a :class:`GenerationTask` or a :class:`MultipleChoiceTask`.
        model: a causal LM (HF `*ForCausalLM` or a PEFT wrapper) on its device.
        tokenizer: its tokenizer (HF, or a lightning_rlm `TextTokenizer`).
        limit: evaluate a seeded subset of this many examples (None: all).
        seed: the subset's seed.
        batch_size: examples per forward / `generate` call (a multiple-choice example brings all its choices).
        max_new_tokens: generation budget (None: the task's).
        scoring: for multiple choice, "mean", "sum" or "letter" (None: the task's `scoring`).
        share_context: likelihood scoring runs each context once and its choices on its KV cache (see
            :func:`choice_logliks`); False scores one full row per choice (models without a KV cache).

    Returns:
        `{"task", "scoring", "accuracy", "correct", "n", "records"}`; likelihood scoring adds
        `accuracy_sum`, `accuracy_mean`, `correct_sum`, `correct_mean`. `records` (one dict per example, in
        file order, from every rank) carry `index, question, prediction, gold, correct` and the completion
        (generation) or the choices and their log-likelihoods (likelihood scoring).
    """
    if getattr(model, "forwards_to_wrapped", False):  # an adapter wrapper: its adapters live in the model's Linears
        model = model.model
    subset = select_indices(len(task), limit, seed)
    rank, world = _dist()
    examples = [task.examples()[i] for i in subset[rank::world]]
    device = _device(model)
    special = task.chat is None  # a rendered chat template carries its own special tokens
    was_training = model.training
    model.eval()
    try:
        if isinstance(task, GenerationTask):
            mode = "generate"
            if scoring not in (None, "generate"):
                raise ValueError(
                    f"task {task.name!r} is a generation task; scoring={scoring!r} does not apply"
                )
            prompts = [task.prompt(ex, tokenizer) for ex in examples]
            completions = generate_greedy(
                model, tokenizer, prompts, max_new_tokens or task.max_new_tokens, batch_size, special
            )
            records = _grade_generation(task, examples, completions)
            keys = ["correct"]
        elif isinstance(task, MultipleChoiceTask):
            mode = scoring or task.scoring
            if mode not in ("mean", "sum", "letter"):
                raise ValueError(f"scoring must be 'mean', 'sum' or 'letter', got {mode!r}")
            if mode == "letter":
                prompts = [task.prompt(ex, tokenizer, letter=True) for ex in examples]
                completions = generate_greedy(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens or task.letter_max_new_tokens,
                    batch_size,
                    special,
                )
                records = []
                for ex, completion in zip(examples, completions):
                    pred = task.extract(completion, ex)
                    records.append(
                        dict(
                            index=ex.index,
                            question=ex.question,
                            choices=ex.choices,
                            completion=completion,
                            prediction=pred,
                            gold=ex.gold,
                            correct=pred == ex.gold,
                        )
                    )
                keys = ["correct"]
            else:
                pairs = [
                    (task.prompt(ex, tokenizer), [task.continuation(c) for c in ex.choices])
                    for ex in examples
                ]
                scores = choice_logliks(model, tokenizer, pairs, batch_size, special, share_context)
                records = []
                for ex, per_choice in zip(examples, scores):
                    sums = [s for s, _ in per_choice]
                    means = [s / n for s, n in per_choice]
                    by_sum, by_mean = ex.labels[_argmax(sums)], ex.labels[_argmax(means)]
                    pred = by_mean if mode == "mean" else by_sum
                    records.append(
                        dict(
                            index=ex.index,
                            question=ex.question,
                            choices=ex.choices,
                            loglik_sum=sums,
                            loglik_mean=means,
                            choice_sum=by_sum,
                            choice_mean=by_mean,
                            correct_sum=by_sum == ex.gold,
                            correct_mean=by_mean == ex.gold,
                            prediction=pred,
                            gold=ex.gold,
                            correct=pred == ex.gold,
                        )
                    )
                keys = ["correct", "correct_sum", "correct_mean"]
        else:
            raise TypeError(
                f"cannot evaluate a {type(task).__name__}: not a GenerationTask or MultipleChoiceTask"
            )
    finally:
        model.train(was_training)

    totals = _reduce_counts([float(sum(r[k] for r in records)) for k in keys] + [float(len(records))], device)
    n = int(totals[-1])
    result: dict[str, Any] = {"task": task.name, "scoring": mode, "n": n}
    for k, total in zip(keys, totals):
        result[k] = int(total)
        result["accuracy" + k[len("correct") :]] = total / n if n else 0.0
    result["records"] = _gather_records(records)
    return result


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first on ties
