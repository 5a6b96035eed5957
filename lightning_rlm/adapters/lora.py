"""LoRA adapters and the reference policy for KL-regularized RL.

KL-regularized objectives need log-probs under a frozen reference policy. With LoRA the reference is free:
the same model with its adapters switched off (:func:`reference_mode`), so no second copy of the weights is
kept. With full fine-tuning the reference must be a frozen deep copy made before training
(:func:`frozen_copy`). :func:`reference_logprobs` picks whichever applies.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn

from lightning_rlm.adapters.wrapping import LinearWrappingModel
from lightning_rlm.checks import read_checkpoint
from lightning_rlm.rollout.generate import completion_logprobs

__all__ = ["add_lora", "frozen_copy", "is_peft_model", "load_lora_weights", "lora_scaling", "reference_logprobs",
           "reference_mode"]


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    use_rslora: bool = False,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap a causal LM with trainable LoRA adapters; the base weights are frozen.

    Args:
        model: an HF causal LM. PEFT injects the adapters in place, so keep a copy first if the plain
            model is still needed.
        rank: LoRA rank ``r`` (>= 1).
        alpha: LoRA alpha; defaults to ``rank`` (scaling 1 without rsLoRA).
        use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank`` (keeps the update's size
            stable across ranks).
        dropout: dropout on the LoRA input path.
        target_modules: module names to adapt, or ``"all-linear"`` (every linear layer except the LM head).
        adapter_name: name of the adapter inside the PEFT model.

    Returns:
        The ``PeftModel``. LoRA ``B`` starts at zero, so its outputs initially equal the base model's.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        lora_dropout=dropout,
        use_rslora=use_rslora,
        target_modules=target_modules,
        bias="none",
    )
    return get_peft_model(model, config, adapter_name=adapter_name)


def is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


@contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily turn a PEFT policy into its reference: adapters disabled, eval mode, no grad.

    Yields the same model object. Eval mode matches :func:`frozen_copy` (no dropout in the reference);
    the adapters and the training flag are restored on exit. For a model without adapters this raises,
    since the reference must then be a separate frozen copy.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"reference_mode needs a PEFT (LoRA) model, got {type(model).__name__}; for full fine-tuning "
            "keep a reference made with frozen_copy(model) before training and pass it as ref_model"
        )
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every parameter frozen and in eval mode: the reference for full fine-tuning."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def reference_logprobs(
    policy: nn.Module,
    ref_model: nn.Module | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_len: int,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Completion log-probs ``[N, C]`` under the reference policy, without gradients.

    Uses ``ref_model`` when given (full fine-tuning); otherwise ``policy`` is evaluated as its own reference:
    a PEFT model with its adapters disabled, or a model with a ``reference()`` context (the dual-LoRA and
    SVD adapters, :class:`~lightning_rlm.adapters.wrapping.LinearWrappingModel`). ``input_ids`` /
    ``attention_mask`` are ``[N, P+C]``.
    """
    if ref_model is not None:
        was_training = ref_model.training
        ref_model.eval()
        try:
            with torch.no_grad():
                logp = completion_logprobs(
                    ref_model, input_ids, attention_mask, completion_len, temperature=temperature
                )
        finally:
            ref_model.train(was_training)
        assert isinstance(logp, Tensor)
        return logp
    with (policy.reference() if isinstance(policy, LinearWrappingModel) else reference_mode(policy)) as ref:
        logp = completion_logprobs(ref, input_ids, attention_mask, completion_len, temperature=temperature)
    assert isinstance(logp, Tensor)
    return logp


# ----- starting an adapter from another run's (SFT before RL) ----------------------------------------------------
def lora_scaling(rank: int, alpha: Optional[float], use_rslora: bool) -> float:
    """The factor LoRA multiplies B·A by: alpha / rank, or alpha / sqrt(rank) with rsLoRA (alpha None: rank)."""
    alpha = float(rank if alpha is None else alpha)
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _adapter_source(source: str | os.PathLike) -> tuple[str, Path]:
    """("peft", folder) for a PEFT adapter folder, ("checkpoint", file) for a checkpoint or a run folder."""
    p = Path(source).expanduser()
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            return "peft", p
        for candidate in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if candidate.is_file():
                return "checkpoint", candidate
        raise FileNotFoundError(f"init_adapter {str(source)!r}: a folder with neither adapter_config.json (a PEFT "
                                "adapter: `lightning-rlm export` without --merge) nor checkpoints/last.ckpt (a run)")
    if p.is_file():
        return "checkpoint", p
    raise FileNotFoundError(f"init_adapter {str(source)!r}: no such file or folder")


def check_lora_source(source: str | os.PathLike, r: int, lora_alpha: Optional[float], use_rslora: bool,
                      adapter: str = "default") -> tuple[str, Path, Optional[dict[str, Any]]]:
    """Where the LoRA weights of `source` are (`load_lora_weights`) and, for a checkpoint, its LoRA tensors of
    `adapter`; a rank or scaling other than those of (r, lora_alpha, use_rslora) is a ValueError. Cheap (a json,
    or a memory-mapped checkpoint): a method checks its `init_adapter` in `__init__`, before loading a model."""
    kind, path = _adapter_source(source)
    want = (int(r), lora_scaling(r, lora_alpha, use_rslora))
    saved = None
    if kind == "peft":
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise ValueError(f"init_adapter {str(source)!r} is a {config.get('peft_type')} adapter, not LoRA")
        got = (int(config["r"]), lora_scaling(config["r"], config.get("lora_alpha"), bool(config.get("use_rslora"))))
        described = (f"rank {config['r']}, lora_alpha {config.get('lora_alpha')}, use_rslora "
                     f"{bool(config.get('use_rslora'))}")
    else:  # mmap: only the LoRA tensors are read
        ckpt = read_checkpoint(path, label=f"init_adapter {str(source)!r}: {str(path)!r}")
        hp = ckpt.get("hyper_parameters") or {}
        got = want if not hp.get("lora_rank") else (
            int(hp["lora_rank"]), lora_scaling(hp["lora_rank"], hp.get("lora_alpha"), bool(hp.get("use_rslora"))))
        described = (f"lora_rank {hp.get('lora_rank')}, lora_alpha {hp.get('lora_alpha')}, use_rslora "
                     f"{bool(hp.get('use_rslora'))}")
        saved = {k[len("policy."):]: v for k, v in ckpt["state_dict"].items()
                 if k.startswith("policy.") and ".lora_" in k and f".{adapter}." in k}  # e.g. not GAN-RL's discriminator
        if not saved:
            raise ValueError(f"init_adapter {str(source)!r}: the checkpoint holds no LoRA weights of a `policy` "
                             "(a full fine-tune? export it with --merge and use the folder as model_name_or_path)")
    if got[0] != want[0] or not math.isclose(got[1], want[1], rel_tol=1e-6):
        raise ValueError(f"init_adapter {str(source)!r} has {described} (scaling {got[1]:.4g}); the policy's LoRA "
                         f"has rank {r}, lora_alpha {lora_alpha}, use_rslora {use_rslora} (scaling "
                         f"{want[1]:.4g}): set lora_rank / lora_alpha / use_rslora to match")
    return kind, path, saved


def load_lora_weights(policy: PeftModel, source: str | os.PathLike) -> dict[str, Any]:
    """Copy the LoRA weights of `source` into `policy`'s active adapter (which must have the same rank and
    scaling); the base weights are not touched. Returns {"kind", "path", "tensors"}.

    `source`: a PEFT adapter folder (`lightning-rlm export` of a LoRA method without `--merge`), or a
    Lightning checkpoint (a file, or a run folder's `checkpoints/last.ckpt`) of a method whose LoRA policy is
    its `policy` attribute (SFTKLBarrier or GRPO with `lora_rank`, GANRL). Every LoRA tensor of `policy` must
    be found there; a mismatch is a ValueError naming what differs (`check_lora_source`).
    """
    if not isinstance(policy, PeftModel):
        raise TypeError(f"load_lora_weights needs a PEFT (LoRA) model, got {type(policy).__name__}")
    name = policy.active_adapter
    cfg = policy.peft_config[name]
    kind, path, saved = check_lora_source(source, cfg.r, cfg.lora_alpha, cfg.use_rslora, adapter=name)
    if kind == "peft":
        base_saved = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
        if base_saved and cfg.base_model_name_or_path and Path(str(base_saved)).name != Path(
                str(cfg.base_model_name_or_path)).name:
            warnings.warn(f"init_adapter {str(source)!r} was trained on {base_saved!r}, the policy is "
                          f"{cfg.base_model_name_or_path!r}", stacklevel=2)
    expected = {n for n, _ in policy.named_parameters() if ".lora_" in n and f".{name}." in n}
    try:
        if kind == "peft":
            from peft.utils import load_peft_weights, set_peft_model_state_dict

            result = set_peft_model_state_dict(policy, load_peft_weights(str(path), device="cpu"), adapter_name=name)
        else:
            result = policy.load_state_dict(saved, strict=False)
    except RuntimeError as e:  # a shape that does not fit (another base model)
        first = str(e).strip().splitlines()
        raise ValueError(f"init_adapter {str(source)!r} does not fit the policy: "
                         f"{first[1].strip() if len(first) > 1 else first[0] if first else type(e).__name__}") from None
    missing = sorted(expected & set(result.missing_keys))
    unexpected = sorted(k for k in result.unexpected_keys if ".lora_" in k)
    if missing or unexpected:
        what = f"{len(missing)} LoRA tensor(s) of the policy missing, e.g. {missing[0]}" if missing else (
            f"{len(unexpected)} unknown LoRA tensor(s), e.g. {unexpected[0]}")
        raise ValueError(f"init_adapter {str(source)!r} does not fit the policy's LoRA ({what}): the same base "
                         "model and target modules are needed")
    return {"kind": kind, "path": str(path), "tensors": len(expected)}
