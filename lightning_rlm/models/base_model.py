"""The base policy of the RL methods: a tiny Llama pretrained here on TinyStories, built once and cached.

The command that builds it is `lightning-rlm base-model` (:mod:`lightning_rlm.workflow.base_model`).
Configs, tests and benchmarks name it `lrlm:tiny-llama-tinystories`; `resolve_model_path` turns that
into the cached HF folder (building it on first use). The cache key is a hash of the pretraining config
and of the data file, so editing either rebuilds it; the folder is written to a temporary name and
renamed, so an interrupted build never leaves a half model behind, and runs started at once on an empty cache
build it once (`paths.build_cached`: the second waits for the first).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from lightning_rlm.paths import REPO_ROOT, build_cached, cache_dir, find_data_path, holds_key

PREFIX = "lrlm:"
BASE_MODELS = {
    # name: (pretraining config, data file it reads)
    "tiny-llama-tinystories": ("configs/lm/llama_tinystories.yaml", "tinystories/tinystories_val_head.txt"),
}


def build_key(name: str) -> str:
    config, data = BASE_MODELS[name]
    h = hashlib.sha256((REPO_ROOT / config).read_bytes())
    found = find_data_path(data)
    if found is None:  # bundled with the package: missing only from a broken install
        raise FileNotFoundError(f"{data!r}, the pretraining data of {name!r}, is not in any data root")
    h.update(found[1].read_bytes())
    return h.hexdigest()[:16]


def base_model_dir(name: str) -> Path:
    return cache_dir("base_models") / name


def is_built(name: str) -> bool:
    return holds_key(base_model_dir(name), build_key(name))


def build(name: str, force: bool = False, extra_args: list[str] | None = None) -> Path:
    """Pretrain `name` with its config (unless cached) and return the HF folder."""
    if name not in BASE_MODELS:
        raise ValueError(f"unknown base model {name!r}; expected one of {sorted(BASE_MODELS)}")
    config, _ = BASE_MODELS[name]

    def pretrain(tmp: Path) -> None:
        cmd = [sys.executable, "-m", "lightning_rlm", "fit", "--config", str(REPO_ROOT / config),
               "--model.init_args.export_dir", str(tmp),
               "--trainer.logger.init_args.save_dir", str(cache_dir("base_models", "runs")),
               *(extra_args or [])]
        print(f"building base model {name!r} (cache miss): {' '.join(cmd)}", file=sys.stderr)
        subprocess.run(cmd, check=True)

    return build_cached(base_model_dir(name), build_key(name), pretrain, force=force)


def resolve_model_path(name_or_path: str) -> str:
    """`lrlm:<name>` → the cached folder (built on first use); anything else is returned unchanged."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    name = name_or_path[len(PREFIX):]
    from lightning_rlm.models.gguf import GGUF_MODELS, convert

    if name in GGUF_MODELS:  # a pretrained chat model shipped in a wheel
        return str(convert(name))
    if name not in BASE_MODELS:
        raise ValueError(f"unknown model {name_or_path!r}; expected one of "
                         f"{sorted(PREFIX + n for n in [*BASE_MODELS, *GGUF_MODELS])}")
    return str(build(name))

