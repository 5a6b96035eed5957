"""What a MAUVE evaluation costs on CPU: featurizing a window with MiniLM, then scoring it.

`MauveCallback` featurizes the model window (and the reference window unless it is a fixed list) and
runs PCA + k-means (`num_buckets = window // 10`) every time it evaluates. This prints, per window size,
the seconds to featurize one window of TinyStories paragraphs (repeated when the sample runs out) with
`MiniLMFeaturizer`, and the seconds to score a model window against a disjoint reference window, so the
`every_n_steps` / `window` trade-off can be chosen knowingly. Both windows are random paragraphs from
disjoint halves of the sample, repeated when a window is larger than half the sample (2,150 paragraphs),
so MAUVE itself should be high (and is biased by the repeats for larger windows).

    python benchmarks/mauve_cost.py --sizes 500 2000 5000
"""

from __future__ import annotations

import argparse
import random
import time
import warnings
from itertools import cycle, islice

import numpy as np
import torch

from lightning_rlm.data.paths import resolve_data_path
from lightning_rlm.metrics import MiniLMFeaturizer, compute_mauve_from_features


def paragraphs() -> list[str]:
    text = resolve_data_path("tinystories/tinystories_val_head.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def window(texts: list[str], n: int) -> list[str]:
    """The first n texts, repeating the list when it is shorter than n."""
    return list(islice(cycle(texts), n))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 5000], help="window sizes")
    parser.add_argument("--batch-size", type=int, default=64, help="featurizer batch size")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--score-threads",
        type=int,
        default=1,
        help="BLAS/OpenMP threads for PCA + k-means; 0 = library default",
    )
    parser.add_argument("--kmeans-num-redo", type=int, default=5)
    parser.add_argument("--kmeans-max-iter", type=int, default=500)
    args = parser.parse_args()

    # Shuffle, then split in halves: model and reference windows are disjoint random samples. (Contiguous
    # blocks would hold different stories on each side, and MiniLM clusters by story: MAUVE ~0.2.)
    texts = paragraphs()
    random.Random(0).shuffle(texts)
    half = len(texts) // 2
    featurizer = MiniLMFeaturizer(batch_size=args.batch_size, device="cpu", num_threads=args.torch_threads)
    t0 = time.perf_counter()
    featurizer(["warm up"])  # load the model outside the timings
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():  # import mauve-text, faiss and scikit-learn outside the timings too
        warnings.simplefilter("ignore")
        compute_mauve_from_features(rng.normal(size=(20, 8)), rng.normal(size=(20, 8)), kmeans_num_redo=1)
    threads = args.torch_threads or torch.get_num_threads()
    print(f"{len(texts)} TinyStories paragraphs; MiniLM load {load_s:.1f}s; torch threads {threads};")
    print(
        f"score threads {args.score_threads or 'default'}; k-means {args.kmeans_num_redo} redo x "
        f"{args.kmeans_max_iter} iter; buckets = window // 10\n"
    )
    header = f"{'window':>7} | {'featurize (s)':>13} | {'texts/s':>7} | {'score (s)':>9} | {'MAUVE':>6} | eval total (s)"
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        p_texts = window(texts[:half], n)
        q_texts = window(texts[half:], n)
        t0 = time.perf_counter()
        p = featurizer(p_texts)  # [n, 384]
        feat_s = time.perf_counter() - t0
        q = featurizer(q_texts)  # [n, 384]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = compute_mauve_from_features(
                p,
                q,
                kmeans_num_redo=args.kmeans_num_redo,
                kmeans_max_iter=args.kmeans_max_iter,
                num_threads=args.score_threads or None,
            )
        score_s = time.perf_counter() - t0
        total = 2 * feat_s + score_s  # both windows featurized, as with rollout references
        print(
            f"{n:>7} | {feat_s:>13.1f} | {n / feat_s:>7.0f} | {score_s:>9.1f} | {out['mauve']:>6.3f} | {total:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
