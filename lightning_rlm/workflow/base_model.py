"""Build the base policy of the RL methods (a tiny Llama pretrained on TinyStories), once, into the cache.

The registry, its cache key and `lrlm:` name resolution live in :mod:`lightning_rlm.models.base_model`.

    lightning-rlm base-model            # build if missing (about 8 minutes on 2 CPU cores), print its path
    lightning-rlm base-model --force    # rebuild
"""

from __future__ import annotations

import argparse

from lightning_rlm.models.base_model import BASE_MODELS, build


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lightning-rlm base-model", description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", default="tiny-llama-tinystories", choices=sorted(BASE_MODELS))
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args, extra = parser.parse_known_args(argv)
    print(build(args.name, force=args.force, extra_args=extra))
