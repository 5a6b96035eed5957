"""Resolve data files, with an error that says how to get a missing one.

The lookup order and the cache folders are :mod:`lightning_rlm.paths` (re-exported here); this module adds
`resolve_data_path`, whose error names every place looked in and the `lightning-rlm data fetch` command of
the catalog (:mod:`lightning_rlm.data.catalog`).
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_rlm.data.catalog import dataset_of_file
from lightning_rlm.paths import (
    BUNDLED_DIR,
    REPO_ROOT,
    cache_dir,
    cache_root,
    data_root,
    data_root_candidates,
    data_roots,
    fetched_data_dir,
    find_data_path,
)

__all__ = [
    "BUNDLED_DIR", "REPO_ROOT", "cache_dir", "cache_root", "data_root", "data_root_candidates", "data_roots",
    "fetched_data_dir", "find_data_path", "missing_data_message", "resolve_data_path",
]


def resolve_data_path(path: str | os.PathLike) -> Path:
    """Resolve `path` as given (absolute or relative to the working directory), else under a data root.

    Raises a one-line FileNotFoundError that names every place looked in, in order, and how to get the file.
    """
    found = find_data_path(path)
    if found is not None:
        return found[1]
    raise FileNotFoundError(missing_data_message(path))


def missing_data_message(path: str | os.PathLike) -> str:
    p = Path(path).expanduser()
    looked = [f"as given ({p.resolve()})"]
    if not p.is_absolute():
        if not os.environ.get("LRLM_DATA_DIR"):
            looked.append("$LRLM_DATA_DIR (unset)")
        looked += [f"{label} ({root})" for label, root in data_roots()]
    dataset = dataset_of_file(str(path))
    how = (f"run `lightning-rlm data fetch {dataset}` (needs network) or set LRLM_DATA_DIR to a folder that holds "
           f"{str(path)!r}" if dataset else "give an existing path or set LRLM_DATA_DIR to the folder that holds it")
    return f"data file {str(path)!r} not found; looked in: {'; '.join(looked)}. To get it: {how}"
