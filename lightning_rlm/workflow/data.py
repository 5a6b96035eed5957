"""`lightning-rlm data`: where each data set's files are found, and fetching the ones that are not bundled.

    lightning-rlm data                         list every data set, its files and where each is found
    lightning-rlm data fetch gsm8k             write GSM8K from the Hugging Face Hub into the data cache
    lightning-rlm data fetch all [--force]     every data set that is not found yet
    lightning-rlm data fetch pile --out DIR    into DIR (default: $LRLM_DATA_DIR, else $LRLM_CACHE_DIR/data)
    lightning-rlm data fetch gsm8k --from DIR  from a local `datasets.save_to_disk` copy (works offline)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lightning_rlm.data.catalog import DATASETS, FetchError, fetch, fetch_all, where
from lightning_rlm.data.paths import data_roots, fetched_data_dir


def default_out() -> Path:
    return Path(os.environ["LRLM_DATA_DIR"]).expanduser() if os.environ.get("LRLM_DATA_DIR") else fetched_data_dir()


def listing() -> str:
    lines = ["Data roots, in lookup order (after a path as given):"]
    lines += [f"  {i}. {label}: {root}{'' if root.is_dir() else '  (absent)'}"
              for i, (label, root) in enumerate(data_roots(), 1)]
    lines.append("")
    width = max(len(f) for d in DATASETS.values() for f in d.files)
    lines.append(f"{'data set':<15} {'file':<{width}}  found in")
    for ds in DATASETS.values():
        for file, found in where(ds):
            lines.append(f"{ds.name:<15} {file:<{width}}  "
                         f"{found or f'missing: lightning-rlm data fetch {ds.name}'}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightning-rlm data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("list", help="list data sets and where their files are found (the default)")
    f = sub.add_parser("fetch", help="write data sets from their public sources")
    f.add_argument("name", help=f"one of {', '.join(n for n, d in DATASETS.items() if not d.bundled)}, or all")
    f.add_argument("--out", type=Path, default=None,
                   help="data root to write into (default: $LRLM_DATA_DIR, else $LRLM_CACHE_DIR/data)")
    f.add_argument("--from", dest="source", type=Path, default=None,
                   help="read a local copy instead of the hub (a datasets.save_to_disk folder, or the file)")
    f.add_argument("--force", action="store_true", help="replace files that exist")
    args = parser.parse_args(argv)
    if args.command in (None, "list"):
        print(listing())
        return 0
    out = (args.out or default_out()).expanduser()
    try:
        if args.source is not None and not args.source.exists():
            raise FetchError(f"--from {args.source}: no such file or folder")
        if args.name == "all":
            if args.source is not None:
                raise FetchError("--from reads one data set; name it instead of 'all'")
            written = fetch_all(out, force=args.force)
        else:
            written = fetch(args.name, out, source=args.source, force=args.force)
    except FetchError as e:
        print(f"lightning-rlm: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    if out != default_out() and not any(root == out for _, root in data_roots()):
        print(f"note: {out} is not a data root; set LRLM_DATA_DIR={out} to use it", file=sys.stderr)
    return 0
