"""Where data and caches live (the layer below `data` and `models`: both read files and caches).

Shipped configs name data files relative to a data root, so the same YAML runs from a bare clone, in CI
and on a cluster. A relative path is looked up, in order, in:

1. the path as given (absolute, or relative to the working directory);
2. `$LRLM_DATA_DIR`, when set;
3. the samples bundled with the package (`lightning_rlm/data/samples`: Tiny Shakespeare, TinyStories);
4. the `shared/data` folder beside the repository (or beside the working directory);
5. the fetched-data cache, `$LRLM_CACHE_DIR/data`, where `lightning-rlm data fetch` writes by default.

Caches (trained tokenizers, base models, fetched data) live under `$LRLM_CACHE_DIR`
(default `~/.cache/lightning_rlm`); a cached folder is built once by `build_cached` (into a temporary folder,
under a lock, so concurrent runs neither build it twice nor break each other's build).
`lightning_rlm.data.paths` adds `resolve_data_path`, whose error names the catalog's fetch command.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: builders of one cache folder are not serialised
    fcntl = None

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DIR = Path(__file__).resolve().parent / "data" / "samples"


def cache_root() -> Path:
    return Path(os.environ.get("LRLM_CACHE_DIR", Path.home() / ".cache" / "lightning_rlm")).expanduser()


def fetched_data_dir() -> Path:
    """Where `lightning-rlm data fetch` writes unless told otherwise (not created here)."""
    return cache_root() / "data"


def data_roots() -> list[tuple[str, Path]]:
    """(label, folder) for every data root, in lookup order; folders need not exist."""
    roots = []
    if os.environ.get("LRLM_DATA_DIR"):
        roots.append(("$LRLM_DATA_DIR", Path(os.environ["LRLM_DATA_DIR"]).expanduser()))
    roots.append(("bundled samples", BUNDLED_DIR))
    shared = [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for folder in dict.fromkeys(p.resolve() for p in shared):  # the same folder once
        roots.append(("shared/data beside the repository", folder))
    roots.append(("fetched-data cache", fetched_data_dir()))
    return roots


def data_root_candidates() -> list[Path]:
    """Folders searched for relative data paths, in order."""
    return [folder for _, folder in data_roots()]


def data_root() -> Path:
    """The first existing data root (`$LRLM_DATA_DIR` when set, else the bundled samples)."""
    candidates = data_root_candidates()
    return next((c for c in candidates if c.is_dir()), candidates[0])


def find_data_path(path: str | os.PathLike) -> tuple[str, Path] | None:
    """(label of the root it was found in, full path), or None when no root holds `path`."""
    p = Path(path).expanduser()
    if p.exists():
        return "path as given", p
    if p.is_absolute():
        return None
    for label, root in data_roots():
        if (root / p).exists():
            return label, root / p
    return None


def cache_dir(*parts: str) -> Path:
    """A folder under the cache root, created on demand."""
    d = cache_root().joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<target>.lock` (flock: released when the process dies) for as long as a
    process builds `target`; a second process waits for it, saying so."""
    lock = target.with_name(target.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process that is building {target} (lock: {lock})", file=sys.stderr)
                fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def holds_key(out: Path, key: str) -> bool:
    """Whether the cached folder `out` is complete and was built for `key` (its BUILD_KEY file)."""
    try:
        return (out / "BUILD_KEY").read_text().strip() == key
    except FileNotFoundError:
        return False


def build_cached(out: Path, key: str, write: Callable[[Path], None], force: bool = False) -> Path:
    """`out`, a cached folder stamped with `key` (its BUILD_KEY file), built unless it holds `key` already (or
    `force`). `write(tmp)` fills a temporary folder, which replaces `out` only once complete, so an interrupted
    build never leaves half a folder. Builders of one folder take turns (`build_lock`): two runs started at once
    on an empty cache build it once, the second finding it built when the first is done."""
    if holds_key(out, key) and not force:
        return out
    with build_lock(out):
        if holds_key(out, key) and not force:
            return out  # built by the process this one waited for
        tmp = out.with_name(out.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a build that was killed (the lock is this process's)
        write(tmp)
        (tmp / "BUILD_KEY").write_text(key + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out
