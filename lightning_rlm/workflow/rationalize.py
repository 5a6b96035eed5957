"""`lightning-rlm rationalize`: give ground-truth completions the reasoning traces that explain them best.

    lightning-rlm rationalize --from-rollouts RUN/rollouts.jsonl --out rationales.jsonl [--model M]
    lightning-rlm rationalize --config configs/gan_rl/05_tinystories.yaml --out rationales.jsonl [--limit N]
        [--num-traces K] [--max-reasoning-tokens N] [--hint] [--chat [JSON]] [--seed S] [--batch-size B]

For each (prefix, ground truth) pair, from a GAN-RL run's `rollouts.jsonl` (deduplicated) or from the
windows of a `PrefixCompletionDataModule` (the `data` of a config, or a data YAML), K reasoning traces are
sampled after GAN-RL's prompt (which opens `<think>`; with `--hint` the ground truth is shown in the
sampling prompt, STaR's rationalization, never in the scored context), each is scored by
log p(ground truth | prompt, trace, think_close) under the model, and the best one is kept beside the
no-reasoning score (`lightning_rlm.rollout.rationalize`). One JSON row per pair goes to `--out`: prefix,
ground_truth, prompt, reasoning (the best trace), think_close, completion (= the ground truth), score,
baseline_score, gain, all_scores, best, traces, ground_truth_tokens, ground_truth_overlap, hint. The file is
the data of `configs/sft_kl_barrier/rationalized_sft.yaml` (`RationalesDataModule`).

The prompt format is GAN-RL's: `--config` (a GAN-RL config) gives its model's prompt_template / chat /
think_close / reasoning_tokens / temperature / top_p and model_name_or_path; with `--from-rollouts` and no
`--config`, the run's `config.yaml` beside the rollouts does; flags override both; otherwise GAN-RL's
defaults (the seed's prompt). `--model` takes an HF folder, an `lrlm:` name or an exported run (a merged
folder, or a PEFT adapter folder: `lightning-rlm export` without --merge). An existing `--out` is refused
unless `--force`; bad input is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

SEED_USER_TEMPLATE = "<prefix>\n{text}\n</prefix>"
DEFAULT_HINT_TEMPLATE = "{text}\n\n(Hint, the text goes on with: {hint})"
GANRL_DEFAULTS = {"think_close": "\n</think>\n", "reasoning_tokens": 256, "temperature": 1.0, "top_p": 1.0}


class RationalizeError(ValueError):
    """Bad input to `rationalize`: one line for the user."""


# ----- inputs: pairs, config, prompt format ------------------------------------------------------------------
def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise RationalizeError(f"--config {str(path)!r}: no such file")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RationalizeError(f"--config {str(path)!r}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise RationalizeError(f"--config {str(path)!r}: not a mapping of settings")
    return cfg


def read_rollouts(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The distinct (prefix, ground_truth) pairs of a GAN-RL `rollouts.jsonl`, in first-seen order."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RationalizeError(f"--from-rollouts {str(path)!r}: no such file")
    pairs: dict[tuple[str, str], None] = {}
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise RationalizeError(f"--from-rollouts {str(path)!r}: line {n} is not JSON") from None
            if not isinstance(row, dict) or not {"prefix", "ground_truth"} <= set(row):
                raise RationalizeError(f"--from-rollouts {str(path)!r}: line {n} has no prefix and ground_truth "
                                       "(a GAN-RL rollouts.jsonl has both)")
            pairs.setdefault((str(row["prefix"]), str(row["ground_truth"])), None)
    if not pairs:
        raise RationalizeError(f"--from-rollouts {str(path)!r}: no rows")
    return list(pairs)


def model_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """The init_args of a config's model when it is GAN-RL (its prompt format and base model), else {}."""
    model = cfg.get("model")
    if isinstance(model, dict) and str(model.get("class_path", "")).split(".")[-1] == "GANRL":
        return dict(model.get("init_args") or {})
    return {}


def pairs_from_config(cfg: dict[str, Any], where: str, split: str) -> list[tuple[str, str]]:
    """(prefix, completion) windows of the config's PrefixCompletionDataModule (its `data`, or the whole file
    when it is a data section itself)."""
    from lightning_rlm import data as data_package
    from lightning_rlm.data import ChatFormat, PrefixCompletionDataModule, TextSource

    section = cfg.get("data", cfg)
    if not isinstance(section, dict) or "class_path" not in section:
        raise RationalizeError(f"--config {where!r}: no data section with a class_path (a PrefixCompletionDataModule)")
    class_path = str(section["class_path"])
    try:
        if "." in class_path:
            module, _, name = class_path.rpartition(".")
            cls = getattr(importlib.import_module(module), name)
        else:
            cls = getattr(data_package, class_path)
    except (ImportError, AttributeError):
        raise RationalizeError(f"--config {where!r}: data class {class_path!r} not found") from None
    if not (isinstance(cls, type) and issubclass(cls, PrefixCompletionDataModule)):
        raise RationalizeError(f"--config {where!r}: data {class_path!r} is not a PrefixCompletionDataModule "
                               "(rationalize needs (prefix, ground-truth completion) windows)")
    init = dict(section.get("init_args") or {})
    if isinstance(init.get("source"), dict):
        init["source"] = TextSource(**init["source"])
    if isinstance(init.get("chat"), dict):
        init["chat"] = ChatFormat(**init["chat"])
    try:
        dm = cls(**init)
    except TypeError as e:
        raise RationalizeError(f"--config {where!r}: data init_args: {e}") from None
    dm.setup("fit")
    examples = dm.train_set if split == "train" else dm.val_set
    return [(ex["prefix"], ex["completion"]) for ex in examples]


def seed_chat() -> Any:
    """Seed 000's prompt through a tokenizer's own chat template (as configs/gan_rl/smollm2_05_pile.yaml)."""
    from lightning_rlm.data import ChatFormat
    from lightning_rlm.tasks.gan_prompts import SEED_PROMPT_TEMPLATE

    system = SEED_PROMPT_TEMPLATE.split("<|im_start|>system\n", 1)[1].split("\n<|im_start|>user", 1)[0]
    return ChatFormat(system=system, user_template=SEED_USER_TEMPLATE, assistant_prefix="<think>\n")


def prompt_renderer(tokenizer: Any, gan: dict[str, Any], args: argparse.Namespace) -> tuple[Callable[[str], str], str]:
    """(prefix -> prompt, description): the flags, else the GAN-RL config's prompt format, else its defaults."""
    from lightning_rlm.checks import check_prompt_template
    from lightning_rlm.data import ChatFormat
    from lightning_rlm.tasks.gan_prompts import SEED_PROMPT_TEMPLATE

    chat, template = None, None
    if args.chat is not None and args.prompt_template is not None:
        raise RationalizeError("give --chat or --prompt-template, not both")
    if args.chat is not None:
        if args.chat == "seed":
            chat = seed_chat()
        else:
            try:
                chat = ChatFormat(**json.loads(args.chat))
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise RationalizeError(f"--chat: a JSON object of ChatFormat fields (system, user_template, "
                                       f"assistant_prefix, add_generation_prompt), got {args.chat!r} ({e})") from None
    elif args.prompt_template is not None:
        template = args.prompt_template
    elif isinstance(gan.get("chat"), dict):
        chat = ChatFormat(**gan["chat"])
    else:
        template = gan.get("prompt_template") or SEED_PROMPT_TEMPLATE
    if chat is not None:
        chat.render(tokenizer, "x")  # no chat template: one clear line now
        return (lambda text: chat.render(tokenizer, text)), "the tokenizer's chat template"
    check_prompt_template(template)
    return (lambda text: template.replace("{text}", text)), "prompt_template"


def fill_hint(template: str, text: str, hint: str) -> str:
    """`template` with `{text}` and `{hint}` filled in one pass (neither text is searched for the other's slot)."""
    return re.sub(r"\{text\}|\{hint\}", lambda m: text if m.group(0) == "{text}" else hint, template)


# ----- the model --------------------------------------------------------------------------------------------
def load_model(spec: str, dtype: Optional[str]) -> tuple[Any, Any, Any]:
    """(model, tokenizer, stop ids) of an HF folder / `lrlm:` name, or of a PEFT adapter folder on its base."""
    from lightning_rlm.models.hf import load_policy, stop_token_ids

    folder = Path(spec).expanduser()
    if not (folder / "adapter_config.json").is_file():
        return load_policy(spec, dtype=dtype)
    from peft import PeftModel
    from transformers import AutoTokenizer

    base_path = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_path:
        raise RationalizeError(f"--model {spec!r}: a PEFT adapter folder whose adapter_config.json names no base model")
    base, tokenizer, stops = load_policy(str(base_path), dtype=dtype)
    model = PeftModel.from_pretrained(base, str(folder))
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        stops = stop_token_ids(tokenizer, getattr(base, "generation_config", None))
    return model, tokenizer, stops


# ----- the run ------------------------------------------------------------------------------------------------
def check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise RationalizeError(f"--out {str(out)!r} is a folder; give a .jsonl file")
    if out.exists() and not force:
        raise RationalizeError(f"--out {str(out)!r} exists; pass --force to replace it")


def rationalize(args: argparse.Namespace) -> dict[str, Any]:
    """Run the command (see the module docstring); returns the summary (`summarize`) plus `out`."""
    out = Path(args.out).expanduser()
    check_out(out, args.force)
    for flag, value in (("--num-traces", args.num_traces), ("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--max-reasoning-tokens", args.max_reasoning_tokens)):
        if value is not None and value < 1:
            raise RationalizeError(f"{flag} must be >= 1, got {value}")
    pairs = read_rollouts(args.from_rollouts) if args.from_rollouts is not None else None
    cfg, cfg_where = {}, None
    if args.config is not None:
        cfg, cfg_where = read_yaml(args.config), args.config
    elif args.from_rollouts is not None and (beside := Path(args.from_rollouts).expanduser().parent / "config.yaml").is_file():
        cfg, cfg_where = read_yaml(beside), str(beside)  # the GAN-RL run that wrote the rollouts
    gan = model_args(cfg)
    if gan:
        print(f"rationalize: prompt format and model from {cfg_where}", file=sys.stderr)
    model_spec = args.model or gan.get("model_name_or_path")
    if not model_spec:
        raise RationalizeError("no model: give --model (or a GAN-RL --config)")
    max_reasoning = args.max_reasoning_tokens or gan.get("reasoning_tokens") or GANRL_DEFAULTS["reasoning_tokens"]
    think_close = args.think_close if args.think_close is not None else gan.get("think_close",
                                                                                 GANRL_DEFAULTS["think_close"])
    temperature = args.temperature if args.temperature is not None else gan.get("temperature", 1.0)
    top_p = args.top_p if args.top_p is not None else gan.get("top_p", 1.0)
    if temperature <= 0 or not 0 < top_p <= 1:
        raise RationalizeError(f"need --temperature > 0 and --top-p in (0, 1], got {temperature}, {top_p}")

    if pairs is None:
        pairs = pairs_from_config(cfg, str(args.config), args.split)
    pairs = pairs[: args.limit] if args.limit is not None else pairs

    import torch
    from tqdm.auto import tqdm

    from lightning_rlm.rollout.rationalize import (
        ground_truth_logprobs,
        rationale_row,
        sample_traces,
        summarize,
        summary_line,
    )

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok, stops = load_model(model_spec, args.dtype)
    model.to(device).eval()
    render, how = prompt_renderer(tok, gan, args)
    print(f"rationalize: {len(pairs)} pairs, {args.num_traces} traces of up to {max_reasoning} tokens each, "
          f"prompts through {how}{', hint shown while sampling' if args.hint else ''}", file=sys.stderr)

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    close_ids = encode(think_close)
    generator = torch.Generator(device).manual_seed(args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.rationalize-{os.getpid()}"
    rows: list[dict[str, Any]] = []
    skipped = 0
    try:
        with tmp.open("w", encoding="utf-8") as f, tqdm(total=len(pairs), unit="pair", desc="rationalize",
                                                         file=sys.stderr, mininterval=1.0) as bar:
            for start in range(0, len(pairs), args.batch_size):
                chunk = []
                for prefix, truth in pairs[start : start + args.batch_size]:
                    if encode(truth):
                        chunk.append((prefix, truth))
                    else:
                        skipped += 1  # nothing to score
                prompts = [render(p) for p, _ in chunk]
                sampled = [render(fill_hint(args.hint_template, p, t)) for p, t in chunk] if args.hint else prompts
                traces = sample_traces(model, [encode(s) for s in sampled], num_traces=args.num_traces,
                                       max_new_tokens=max_reasoning, eos_token_id=stops,
                                       pad_token_id=tok.pad_token_id, temperature=temperature, top_p=top_p,
                                       generator=generator) if chunk else []
                texts = [[tok.decode(t, skip_special_tokens=True) for t in per] for per in traces]
                contexts, targets = [], []
                for prompt, (_, truth), per in zip(prompts, chunk, texts):
                    for reasoning in [*per, ""]:  # the K traces, then no reasoning (the baseline)
                        contexts.append(encode(prompt) + encode(reasoning) + close_ids)
                        targets.append(encode(truth))
                scores = ground_truth_logprobs(model, contexts, targets, tok.pad_token_id) if chunk else []
                k1 = args.num_traces + 1
                for i, ((prefix, truth), prompt, per) in enumerate(zip(chunk, prompts, texts)):
                    s = scores[i * k1 : (i + 1) * k1]
                    row = rationale_row(prefix=prefix, ground_truth=truth, prompt=prompt, think_close=think_close,
                                        traces=per, scores=s[:-1], baseline_score=s[-1],
                                        ground_truth_tokens=len(targets[i * k1]), hint=args.hint)
                    rows.append(row)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(pairs[start : start + args.batch_size]))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    stats = summarize(rows)
    print(f"rationalize: wrote {out}" + (f" ({skipped} pairs with an empty ground truth skipped)" if skipped else ""))
    print(f"rationalize: {summary_line(stats)}")
    return {**stats, "out": str(out)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-rlm rationalize", description=__doc__.split("\n")[0],
                                     epilog="Then: lightning-rlm fit --config configs/sft_kl_barrier/"
                                            "rationalized_sft.yaml --data.init_args.source.path OUT "
                                            "(docs/rationalize.md)")
    source = parser.add_argument_group("pairs (one of)")
    source.add_argument("--from-rollouts", default=None, metavar="PATH",
                        help="a GAN-RL run's rollouts.jsonl (distinct prefix/ground_truth pairs; the run's "
                             "config.yaml beside it gives the prompt format unless --config)")
    source.add_argument("--config", default=None,
                        help="a GAN-RL config (its data's windows, its prompt format and model) or a data YAML "
                             "(a PrefixCompletionDataModule)")
    parser.add_argument("--split", choices=("train", "val"), default="train", help="--config's windows (train)")
    parser.add_argument("--model", default=None, help="HF folder, lrlm: name, or an exported run (merged or a PEFT "
                                                      "adapter folder); default: the GAN-RL config's")
    parser.add_argument("--out", required=True, help="the jsonl to write (refused if it exists, unless --force)")
    parser.add_argument("--num-traces", type=int, default=4, metavar="K", help="traces sampled per pair (4)")
    parser.add_argument("--max-reasoning-tokens", type=int, default=None,
                        help="trace budget (default: the config's reasoning_tokens, else 256)")
    parser.add_argument("--hint", action="store_true",
                        help="show the ground truth in the sampling prompt (STaR rationalization); never in the "
                             "scored context")
    parser.add_argument("--hint-template", default=DEFAULT_HINT_TEMPLATE,
                        help="the prompt text with --hint, {text} = prefix, {hint} = ground truth "
                             f"(default {DEFAULT_HINT_TEMPLATE!r})")
    parser.add_argument("--chat", nargs="?", const="seed", default=None, metavar="JSON",
                        help="render prompts with the tokenizer's chat template: alone, seed 000's system text, "
                             "<prefix> user turn and '<think>\\n' (as configs/gan_rl/smollm2_05_pile.yaml); or a "
                             "JSON object of ChatFormat fields")
    parser.add_argument("--prompt-template", default=None,
                        help="a prompt with {text} (default: the config's, else GAN-RL's seed prompt)")
    parser.add_argument("--think-close", default=None, help="text after the reasoning (default: the config's, "
                                                            "else '\\n</think>\\n')")
    parser.add_argument("--temperature", type=float, default=None, help="sampling (default: the config's, else 1)")
    parser.add_argument("--top-p", type=float, default=None, help="sampling (default: the config's, else 1)")
    parser.add_argument("--limit", type=int, default=None, help="the first N pairs only")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="pairs per step: K traces each are sampled, then K + 1 contexts each scored (8)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="load the model in this torch dtype (e.g. bfloat16)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.from_rollouts is None and args.config is None:
            raise RationalizeError("give --from-rollouts PATH or --config YAML (where the pairs come from)")
        rationalize(args)
    except (ValueError, KeyError, OSError) as e:  # bad input: a path, a config, a model
        if os.environ.get("LRLM_DEBUG"):
            raise
        message = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip().splitlines()
        print(f"lightning-rlm: error: {message[0] if message else type(e).__name__}", file=sys.stderr)
        return 2
    return 0
