"""`lightning-rlm export`: a trained method's language model as a Hugging Face folder.

    lightning-rlm export --ckpt_path RUN/checkpoints/last.ckpt --out DIR [--merge] [--adapter_mode MODE]
                         [--tokenizer PATH] [--force]

The method is the one that wrote the checkpoint (its `_class_path`, else the run's `config.yaml`); its hook
`exportable_lm(adapter_mode)` (:class:`~lightning_rlm.models.exportable.ExportableLM`) says which LM it
trains. DIR then holds, with the tokenizer (chat template included) and `EXPORT.json` (method, checkpoint,
step, adapter mode, merged or not):

* full fine-tuning (GRPO, SFT-KL barrier, the HF LM baseline, Quiet-STaR's LM): the model, for
  `AutoModelForCausalLM.from_pretrained(DIR)`;
* PEFT LoRA (GRPO / SFT with `lora_rank`, GAN-RL's generator; of a PEFT model with several adapters, the
  active one): a PEFT adapter folder, for
  `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)` with BASE the base model
  recorded in its `adapter_config.json`; with `--merge` the LoRA is folded into the weights (a plain folder);
* the two-adapter methods (gradient routing's dual LoRA, projected GRPO's SVD knobs): always merged, with
  the adapters of `--adapter_mode` folded in; by default the deployed model: `retain_only` (forget adapter
  ablated) for gradient routing, `no_hack` (δS_hack ablated) for projected GRPO;
* Quiet-STaR: the LM as trained (its base path, no thoughts) plus `quiet_star.pt`, the thought markers,
  mixing head and thinking settings (`QuietStarLM.from_export(DIR)` rebuilds the thinking model).

The method is rebuilt with `load_from_checkpoint`; init arguments its hyperparameters leave out (LanguageModel's
`network`) come from the run's `config.yaml`. A tokenizer that belongs to the DataModule (the LM baseline,
Quiet-STaR on a random model) is the one the run saved in its folder (`tokenizer/`), else the DataModule's from
`config.yaml`; `--tokenizer` replaces any of them. A non-empty DIR is refused unless `--force` (which replaces
it); bad input is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from lightning_rlm.checks import read_checkpoint

EXPORT_FILE = "EXPORT.json"


class ExportError(ValueError):
    """Bad input to `export`: one line for the user."""


# ----- finding the checkpoint, the method and the run ----------------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder holding `checkpoints/last.ckpt` (or `last.ckpt`)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise ExportError(f"--ckpt_path {str(path)!r}: a folder without checkpoints/last.ckpt; give a checkpoint file")
    if not p.is_file():
        raise ExportError(f"--ckpt_path {str(path)!r}: no such file")
    return p


def run_folders(ckpt: Path) -> list[Path]:
    """Where a run keeps its config.yaml and tokenizer/ around its checkpoint: the logger's version folder
    (`<version>/checkpoints/x.ckpt`) or, in a sweep, `<run>/tb/version_0` beside `<run>/checkpoints`."""
    run = ckpt.parent.parent
    return [ckpt.parent, run, *sorted(run.glob("*/version_*"))]


def run_config(ckpt: Path) -> Optional[dict[str, Any]]:
    import yaml

    for folder in run_folders(ckpt):
        if (folder / "config.yaml").is_file():
            return yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
    return None


def method_class(ckpt: Path, hparams: dict[str, Any]) -> type:
    """The LightningModule class that wrote `ckpt` (hparams `_class_path`, else the run's config.yaml)."""
    import lightning as L

    path = hparams.get("_class_path")
    if not path:
        config = run_config(ckpt) or {}
        path = ((config.get("model") or {}).get("class_path")) if isinstance(config.get("model"), dict) else None
    if not path:
        raise ExportError(f"--ckpt_path {str(ckpt)!r}: cannot tell which method wrote it (no _class_path in its "
                          "hyperparameters and no config.yaml in its run folder)")
    module, _, name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ExportError(f"--ckpt_path {str(ckpt)!r}: its method {path!r} cannot be imported ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise ExportError(f"--ckpt_path {str(ckpt)!r}: {path!r} is not a LightningModule")
    if not hasattr(cls, "exportable_lm"):
        raise ExportError(f"{cls.__name__} trains no Hugging Face language model to export (it has no "
                          "exportable_lm); export works for GRPO, GradientRouting, ProjectedGRPO, GANRL, "
                          "SFTKLBarrier, QuietStar and LanguageModel with an HF network")
    return cls


def init_args_left_out(cls: type, hparams: dict[str, Any], ckpt: Path) -> dict[str, Any]:
    """Init arguments the checkpoint's hyperparameters leave out (a method's `save_hyperparameters(ignore=...)`,
    e.g. LanguageModel's `network`, GRPO's `rewards`) but the run's config.yaml names: without them the method
    would be rebuilt with their defaults (a GRU instead of the HF network). Only for a checkpoint written by
    the CLI, whose hyperparameters are rebuilt through jsonargparse (so class_path values are understood)."""
    if "_instantiator" not in hparams:
        return {}
    model = (run_config(ckpt) or {}).get("model")
    if not isinstance(model, dict) or model.get("class_path") not in (None, hparams.get("_class_path")):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind in kinds} - {"self"}
    return {k: v for k, v in (model.get("init_args") or {}).items() if k in named and k not in hparams}


def check_out(out: Path, force: bool, ckpt: Path) -> None:
    """Refuse a DIR that is a file, holds something (without --force), or holds the checkpoint itself."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"--out {str(out)!r} is not empty; pass --force to replace it")
        where = out.resolve()
        if where in ckpt.resolve().parents:
            raise ExportError(f"--out {str(out)!r} holds the checkpoint; --force would delete it, "
                              "choose another folder")
        if where in (Path.cwd(), *Path.cwd().parents, Path.home()):
            raise ExportError(f"--out {str(out)!r} is the working folder, one above it or the home folder; --force "
                              "would delete it, choose a new folder")


# ----- the tokenizer ---------------------------------------------------------------------------------------
def _hf(tokenizer: Any, where: str) -> Any:
    hf = getattr(tokenizer, "hf", tokenizer)
    if not hasattr(hf, "save_pretrained"):
        raise ExportError(f"the tokenizer from {where} is a {type(tokenizer).__name__}, not a Hugging Face "
                          "tokenizer, so it cannot go into an HF folder; pass --tokenizer")
    return hf


def run_tokenizer(ckpt: Path) -> Any:
    """The DataModule's tokenizer of the run: the copy saved in its folder, else its config's `tokenizer`."""
    from lightning_rlm.data.tokenizers import build_tokenizer

    for folder in run_folders(ckpt):
        if (folder / "tokenizer").is_dir():
            return _hf(build_tokenizer(str(folder / "tokenizer")), str(folder / "tokenizer"))
    config = run_config(ckpt) or {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    spec = (data.get("init_args") or {}).get("tokenizer")
    if spec and spec not in ("char", "bpe"):  # those two are built from the corpus
        return _hf(build_tokenizer(str(spec)), f"the run's data.init_args.tokenizer={spec!r}")
    raise ExportError(f"no tokenizer: the method's tokenizer is its DataModule's and the run folder of {str(ckpt)!r} "
                      "holds none (tokenizer/); pass --tokenizer PATH")


# ----- writing -----------------------------------------------------------------------------------------------
def save_model(lm: Any, folder: Path, merge: bool) -> dict[str, Any]:
    """Write `lm.model` into `folder` as an HF model or a PEFT adapter folder; returns what was written."""
    from lightning_rlm.adapters import is_peft_model
    from lightning_rlm.adapters.wrapping import LinearWrappingModel

    model = lm.model
    info: dict[str, Any] = {"adapter_mode": lm.adapter_mode}
    if isinstance(model, LinearWrappingModel):
        info |= {"adapters": type(model).__name__, "merged": True, "format": "hf"}
        model = model.merge_and_unload(lm.adapter_mode or "both")
    elif lm.adapter_mode is not None:
        raise ExportError(f"adapter mode {lm.adapter_mode!r} given for a {type(model).__name__}, which has no "
                          "adapter modes")
    elif is_peft_model(model):
        base = model.peft_config[model.active_adapter].base_model_name_or_path
        info |= {"adapters": "peft_lora", "base_model": base}
        if merge:
            info |= {"merged": True, "format": "hf"}
            model = model.merge_and_unload()
        else:
            info |= {"merged": False, "format": "peft_adapter"}
            # the active adapter only: a method with more than one (GAN-RL's separate discriminator adapter)
            # keeps the others out, as merge_and_unload (which folds in the active one) does
            model.save_pretrained(str(folder), selected_adapters=[model.active_adapter])
            return info
    else:
        info |= {"adapters": None, "merged": False, "format": "hf"}
    if not hasattr(model, "save_pretrained"):
        raise ExportError(f"the LM is a {type(model).__name__}, not a Hugging Face model")
    model.save_pretrained(str(folder))
    return info


def export(ckpt_path: str | os.PathLike, out: str | os.PathLike, merge: bool = False,
           adapter_mode: Optional[str] = None, tokenizer: Optional[str] = None, force: bool = False) -> dict[str, Any]:
    """Export the LM of a checkpoint into `out` (see the module docstring); returns the EXPORT.json record."""
    import torch

    ckpt = resolve_checkpoint(ckpt_path)
    out = Path(out).expanduser()
    check_out(out, force, ckpt)
    header = read_checkpoint(ckpt)
    hparams = dict(header.get("hyper_parameters") or {})
    cls = method_class(ckpt, hparams)
    modes = tuple(getattr(cls, "export_adapter_modes", ()))
    if adapter_mode is not None and adapter_mode not in modes:
        raise ExportError(f"--adapter_mode {adapter_mode!r}: " + (
            f"{cls.__name__} exports one of {', '.join(modes)} (default {modes[0]})" if modes
            else f"{cls.__name__} has no adapter modes"))
    step, epoch = header.get("global_step"), header.get("epoch")
    del header
    tok, tok_source = None, f"--tokenizer {tokenizer}"
    if tokenizer is not None:  # checked before the model loads
        from lightning_rlm.data.tokenizers import build_tokenizer

        tok = _hf(build_tokenizer(tokenizer), f"--tokenizer {tokenizer!r}")

    try:
        module = cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False,
                                          **init_args_left_out(cls, hparams, ckpt))
    except RuntimeError as e:  # e.g. a state dict that does not fit the method's model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"--ckpt_path {str(ckpt)!r}: cannot load it into {cls.__name__}: {first}") from e
    module.eval()
    lm = module.exportable_lm(adapter_mode)
    if tok is None:
        if lm.tokenizer is not None:
            tok, tok_source = lm.tokenizer, "the method's"
        else:
            tok, tok_source = run_tokenizer(ckpt), "the run's"

    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with torch.no_grad():
            info = save_model(lm, tmp, merge)
        tok.save_pretrained(str(tmp))
        for name, obj in lm.extras.items():
            torch.save(obj, tmp / name)
        record = {"method": f"{cls.__module__}.{cls.__qualname__}", "checkpoint": str(ckpt.resolve()),
                  "global_step": step, "epoch": epoch, "exported": lm.description, **info,
                  "extras": sorted(lm.extras), "tokenizer": tok_source}
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-rlm export", description=__doc__.split("\n")[0],
        epilog="Load the folder with AutoModelForCausalLM.from_pretrained(DIR), or, for an unmerged LoRA, "
               "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR).")
    parser.add_argument("--ckpt_path", required=True,
                        help="a checkpoint of any method that trains an LM, or a run folder "
                             "(its checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="the folder to write (must be empty or absent)")
    parser.add_argument("--merge", action="store_true",
                        help="fold a PEFT LoRA into the weights (a plain HF folder) instead of writing a PEFT "
                             "adapter folder; the dual-LoRA and SVD adapters are always merged")
    parser.add_argument("--adapter_mode", default=None,
                        help="adapters to fold in for the two-adapter methods: GradientRouting "
                             "both|retain_only|forget_only|base (default retain_only, the deployed model), "
                             "ProjectedGRPO both|no_hack|hack_only|base (default no_hack, δS_hack ablated)")
    parser.add_argument("--tokenizer", default=None,
                        help="the tokenizer to save (a folder or name); default: the method's, else the run's")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        record = export(args.ckpt_path, args.out, merge=args.merge, adapter_mode=args.adapter_mode,
                        tokenizer=args.tokenizer, force=args.force)
    except (ValueError, KeyError, OSError) as e:  # bad input: a path, a checkpoint, a missing base model
        if os.environ.get("LRLM_DEBUG"):
            raise
        message = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip().splitlines()
        print(f"lightning-rlm: error: {message[0] if message else type(e).__name__}", file=sys.stderr)
        return 2
    how = {"peft_adapter": f"PEFT adapter on {record.get('base_model')}"}.get(record["format"], "HF model")
    mode = f", adapter mode {record['adapter_mode']}" if record["adapter_mode"] else ""
    merged = ", merged" if record["merged"] else ""
    print(f"exported {record['method'].rsplit('.', 1)[-1]} (step {record['global_step']}{mode}{merged}) "
          f"as {how} to {args.out}")
    return 0
