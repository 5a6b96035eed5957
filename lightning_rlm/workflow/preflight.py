"""Checks on the parsed config that the CLI runs before any class is built (no model loaded, no folder made).

Each raises ValueError with one line that names the bad value and what was expected; `lightning_rlm.cli`
turns it into `lightning-rlm: error: ...` and exit code 2. What Lightning, torch or the OS would only find
after the models are loaded (an accelerator that is not there, a negative `max_steps`, a save folder under a
regular file, a truncated or foreign checkpoint, Trainer options a manually optimised method cannot honour,
`predict` on a method that cannot predict) is found here instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from jsonargparse import Namespace

from lightning_rlm.checks import read_checkpoint


def _model_class(cfg: Namespace) -> Optional[type]:
    path = str(getattr(cfg.get("model"), "class_path", "") or "")
    if not path:
        return None
    from jsonargparse._util import import_object

    try:
        return import_object(path)
    except Exception:  # noqa: BLE001 - jsonargparse reports a bad class path itself
        return None


def check_trainer(cfg: Namespace) -> None:
    trainer = cfg.trainer
    max_steps = trainer.get("max_steps")
    if max_steps is not None and max_steps < -1:
        raise ValueError(f"trainer.max_steps={max_steps}: expected a non-negative number of steps, or -1 for no limit")
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if accelerator in ("gpu", "cuda", "mps"):
        import torch

        have = torch.cuda.is_available() if accelerator != "mps" else torch.backends.mps.is_available()
        if not have and not (accelerator == "gpu" and torch.backends.mps.is_available()):
            raise ValueError(f"trainer.accelerator={accelerator!r}: no such device on this machine "
                             "(torch sees no GPU); use 'cpu' or 'auto'")
    elif accelerator == "tpu":
        raise ValueError("trainer.accelerator='tpu': TPUs are not supported by lightning_rlm; use 'cpu', 'gpu' or 'auto'")


def check_folders(cfg: Namespace) -> None:
    """A folder the run would create under a regular file fails here, not after the models load."""
    logger = cfg.trainer.get("logger")
    init = logger.get("init_args") if isinstance(logger, Namespace) else None
    places = {"trainer.default_root_dir": cfg.trainer.get("default_root_dir"),
              "trainer.logger.init_args.save_dir": init.get("save_dir") if init is not None else None,
              "checkpoint.dirpath": cfg.get("checkpoint") and cfg.checkpoint.get("dirpath")}
    for key, value in places.items():
        if not value:
            continue
        p = Path(str(value)).expanduser()
        for parent in [p, *p.parents]:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(f"{key}={str(value)!r}: {parent} is a file, so no folder can be made there; "
                                     "choose a folder path")
                break


def check_checkpoint(cfg: Namespace) -> None:
    """`ckpt_path` is a readable checkpoint of the same method (and base model) as the config."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return
    ckpt = read_checkpoint(ckpt_path)
    hp = ckpt.get("hyper_parameters") or {}
    model = cfg.get("model")
    want, have = str(getattr(model, "class_path", "") or ""), str(hp.get("_class_path", "") or "")
    if want and have and want != have:
        raise ValueError(f"ckpt_path={str(ckpt_path)!r} is a checkpoint of {have}, but the config trains {want}; "
                         "resume with the config that wrote it")
    init = model.get("init_args") if isinstance(model, Namespace) else None
    for key in ("model_name_or_path",):
        mine = init.get(key) if init is not None else None
        theirs = hp.get(key)
        if mine and theirs and str(mine) != str(theirs):
            raise ValueError(f"ckpt_path={str(ckpt_path)!r} was trained from {key}={theirs!r}, but the config "
                             f"names {mine!r}; resume with the same base model")


def check_subcommand(cfg: Namespace, subcommand: str) -> None:
    cls = _model_class(cfg)
    if cls is None:
        return
    import lightning as L
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if subcommand == "predict" and not (is_overridden("predict_step", cls, L.LightningModule)
                                        or is_overridden("forward", cls, L.LightningModule)):
        raise ValueError(f"predict: {cls.__name__} has no predict_step; predict works for methods that define one "
                         "(e.g. lightning_rlm.methods.LanguageModel)")
    if getattr(cls, "manual_optimization", False) and subcommand == "fit":
        trainer = cfg.trainer
        for key, default in (("accumulate_grad_batches", 1), ("gradient_clip_val", None)):
            value: Any = trainer.get(key)
            if value not in (default, None) and not (key == "gradient_clip_val" and value == 0):
                raise ValueError(f"trainer.{key}={value}: {cls.__name__} optimises manually, so Lightning cannot "
                                 f"apply it; use the method's own setting (e.g. model.init_args.max_grad_norm)")


def check_method_args(cfg: Namespace) -> None:
    model = cfg.get("model")
    init = model.get("init_args") if isinstance(model, Namespace) else None
    if init is None:
        return
    rank = init.get("lora_rank")
    if rank is not None and rank < 1:
        raise ValueError(f"model.init_args.lora_rank={rank}: expected a rank >= 1, or null for full fine-tuning")


def _local_model_config(name_or_path: str) -> Optional[dict]:
    """config.json of a model that is already on disk (a folder, or a built `lrlm:` base model), else None."""
    import json

    from lightning_rlm.models.base_model import PREFIX, base_model_dir

    path = base_model_dir(name_or_path[len(PREFIX):]) if name_or_path.startswith(PREFIX) else Path(name_or_path)
    config = path.expanduser() / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def check_context_length(cfg: Namespace) -> None:
    """Prompt + completion tokens that do not fit the model's positions are refused before it loads."""
    model, data = cfg.get("model"), cfg.get("data")
    m = model.get("init_args") if isinstance(model, Namespace) else None
    d = data.get("init_args") if isinstance(data, Namespace) else None
    if m is None or d is None or not m.get("model_name_or_path"):
        return
    config = _local_model_config(str(m.model_name_or_path))
    if config is None:
        return
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    parts = [(f"data.init_args.{k}", d.get(k)) for k in ("prompt_tokens", "prefix_tokens", "block_size")]
    parts += [(f"model.init_args.{k}", m.get(k)) for k in ("max_completion_length",)]
    if d.get("prefix_tokens") and d.get("completion_tokens"):
        parts.append(("data.init_args.completion_tokens", d.get("completion_tokens")))
    parts = [(k, v) for k, v in parts if isinstance(v, int) and v > 0]
    need = sum(v for _, v in parts)
    if positions and parts and need > positions:
        terms = " + ".join(f"{k}={v}" for k, v in parts)
        raise ValueError(f"{terms} = {need} tokens, but model {m.model_name_or_path!r} has "
                         f"{positions} positions; shorten the prompts or completions")


def _vocabulary(spec: str) -> Optional[dict]:
    """token → id of a tokenizer given as `gpt2`, a tokenizer.json, or a folder holding one (None: unknown)."""
    import json


    if spec == "gpt2":  # a missing file is the data error naming its fetch command, before any model loads
        from lightning_rlm.data.paths import resolve_data_path

        path = resolve_data_path("gpt2-tokenizer/gpt2_tokenizer.json")
    else:
        p = Path(spec).expanduser()
        path = p / "tokenizer.json" if p.is_dir() else p if p.suffix == ".json" else None
    if path is None or not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = dict(data.get("model", {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return vocab


def check_tokenizer_matches_policy(cfg: Namespace) -> None:
    """The DataModule's tokenizer is the pretrained policy's (its ids are fed to that model as they are)."""
    model, data = cfg.get("model"), cfg.get("data")
    m = model.get("init_args") if isinstance(model, Namespace) else None
    d = data.get("init_args") if isinstance(data, Namespace) else None
    if m is None or d is None or not m.get("model_name_or_path") or not d.get("tokenizer"):
        return
    name, spec = str(m.model_name_or_path), str(d.tokenizer)
    if spec == name or _local_model_config(name) is None:
        return
    from lightning_rlm.models.base_model import PREFIX, base_model_dir

    policy_dir = base_model_dir(name[len(PREFIX):]) if name.startswith(PREFIX) else Path(name).expanduser()
    if spec in ("char", "bpe"):
        raise ValueError(f"data.init_args.tokenizer={spec!r} builds a new vocabulary from the corpus, but the policy "
                         f"{name!r} reads its own tokenizer's ids; use data.init_args.tokenizer={name!r}")
    ours, theirs = _vocabulary(spec), _vocabulary(str(policy_dir))
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(f"data.init_args.tokenizer={spec!r} ({len(ours)} tokens) is not the tokenizer of the policy "
                         f"{name!r} ({len(theirs)} tokens); use data.init_args.tokenizer={name!r}")


def preflight(cfg: Namespace, subcommand: str) -> None:
    """Every check above, in the order a user would fix them."""
    check_trainer(cfg)
    check_folders(cfg)
    check_method_args(cfg)
    check_context_length(cfg)
    check_tokenizer_matches_policy(cfg)
    check_subcommand(cfg, subcommand)
