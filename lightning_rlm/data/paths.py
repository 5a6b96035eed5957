"""Where data and caches live.

Shipped configs name files relative to one data root, so the same YAML runs on a laptop, in CI and on a
cluster. The root is `$LRLM_DATA_DIR` when set, else the `shared/data` folder beside the repository.
Caches (trained tokenizers, the pretrained base model) live under `$LRLM_CACHE_DIR`
(default `~/.cache/lightning_rlm`).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root_candidates() -> list[Path]:
    """Folders searched for relative data paths, in order."""
    if os.environ.get("LRLM_DATA_DIR"):
        return [Path(os.environ["LRLM_DATA_DIR"]).expanduser()]
    return [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "data"]


def data_root() -> Path:
    """The first existing data root (or the first candidate, for error messages)."""
    candidates = data_root_candidates()
    return next((c for c in candidates if c.is_dir()), candidates[0])


def resolve_data_path(path: str | os.PathLike) -> Path:
    """Resolve `path` as given (absolute or relative to the working directory), else under the data root.

    Raises FileNotFoundError that names every place looked in and how to change the root.
    """
    p = Path(path).expanduser()
    if p.exists():
        return p
    tried = [p.resolve()]
    if not p.is_absolute():
        for root in data_root_candidates():
            q = root / p
            if q.exists():
                return q
            tried.append(q)
    looked = "\n  ".join(str(t) for t in tried)
    raise FileNotFoundError(
        f"data file {str(path)!r} not found. Looked in:\n  {looked}\n"
        "Relative paths are resolved against the data root: set LRLM_DATA_DIR to the folder that holds "
        "the data (default: the `shared/data` folder beside the repository)."
    )


def cache_dir(*parts: str) -> Path:
    """A folder under the cache root, created on demand."""
    root = Path(os.environ.get("LRLM_CACHE_DIR", Path.home() / ".cache" / "lightning_rlm")).expanduser()
    d = root.joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d
