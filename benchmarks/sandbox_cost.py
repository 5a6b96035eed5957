"""What sandboxed code execution costs: seconds per completion, sequentially and with a thread pool.

Each completion is one fresh, resource-limited interpreter (`lightning_rlm.rewards.sandbox.Sandbox`), so the
cost is mostly interpreter start-up (~20-40 ms) plus the harness. Cases: an empty program (the floor), the
honest solutions of the coding substrate (`lightning_rlm.tasks.coding`, each on its visible and hidden
tests), programs that loop forever (each costs the wall-clock `--timeout`), a GRPO-sized batch of 64
distinct completions (the 38 honest solutions and 26 hacked ones), and that batch once more through a
`Sandbox(cache_size=...)` that has run it (a fixed teacher pool and a student repeating itself). Each case runs with `max_workers=1` and
with the pool (`--workers`, default 2), `--repeats` times (the fastest is reported: other work on a shared
machine only slows a run down). `--ballast-gb` makes this process hold that much touched memory first, as
a training process does (child start-up is a vfork, so it should barely matter; `--preexec` sets the limits
in `preexec_fn`, which forces a fork and does make it matter).

    python benchmarks/sandbox_cost.py [--workers 2] [--timeout 1.0] [--repeats 2] [--ballast-gb 1] [--preexec]
"""

from __future__ import annotations

import argparse
import time

from lightning_rlm.rewards.code import LOOPHOLES
from lightning_rlm.rewards.sandbox import Job, Sandbox
from lightning_rlm.tasks.coding import hacked_solution, load_problems


def timed(sandbox: Sandbox, jobs: list[Job], repeats: int) -> tuple[float, list[str]]:
    best, statuses = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        results = sandbox.run_many(jobs)
        best = min(best, time.perf_counter() - start)
        statuses = [r.status for r in results]
    return best, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="pool size of the parallel column")
    parser.add_argument("--timeout", type=float, default=1.0, help="wall-clock limit of the timeout case (s)")
    parser.add_argument("--loops", type=int, default=4, help="completions in the timeout case")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ballast-gb", type=float, default=0.0, help="memory this process holds (GB)")
    parser.add_argument("--preexec", action="store_true", help="set the limits in preexec_fn too")
    args = parser.parse_args()
    ballast = bytearray(int(args.ballast_gb * 2**30))
    for i in range(0, len(ballast), 4096):  # touch every page, so a fork has to copy its page tables
        ballast[i] = 1

    problems = load_problems()
    honest = [Job(p.solution, p.entry_point, (p.example, *p.tests)) for p in problems]
    hacks = [Job(hacked_solution(p, h), p.entry_point, (p.example, *p.tests))
             for p in problems for h in LOOPHOLES]
    batch = honest + hacks[: 64 - len(honest)]
    cases = [
        ("empty program", [Job(f"x = {i}\n") for i in range(8)]),
        ("honest solutions", honest),
        (f"infinite loop ({args.timeout:g} s timeout)", [Job(f"while True:\n    x = {i}\n") for i in range(args.loops)]),
        ("GRPO batch of 64", batch),
    ]
    print(f"{'case':34s} {'n':>4s} {'sequential s/compl':>19s} {f'pool({args.workers}) s/compl':>18s} "
          f"{'seq total s':>12s} {'pool total s':>13s}  statuses")
    for name, jobs in cases:
        timeout = args.timeout if "loop" in name else 5.0
        seq, statuses = timed(Sandbox(timeout=timeout, max_workers=1, preexec=args.preexec), jobs, args.repeats)
        par, _ = timed(Sandbox(timeout=timeout, max_workers=args.workers, preexec=args.preexec), jobs, args.repeats)
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        print(f"{name:34s} {len(jobs):4d} {seq / len(jobs):19.3f} {par / len(jobs):18.3f} {seq:12.2f} {par:13.2f}"
              f"  {counts}")
    # the same batch again with Sandbox(cache_size=...): the second call is answered from the first's results
    for workers in (1, args.workers):
        cached = Sandbox(timeout=5.0, max_workers=workers, cache_size=len(batch), preexec=args.preexec)
        cached.run_many(batch)
        start = time.perf_counter()
        cached.run_many(batch)
        again = time.perf_counter() - start
        if workers == 1:
            seq_again = again
    print(f"{'GRPO batch of 64, seen (cache_size)':34s} {len(batch):4d} {seq_again / len(batch):19.3f} "
          f"{again / len(batch):18.3f} {seq_again:12.4f} {again:13.4f}  cache hits {cached.cache_hits}")


if __name__ == "__main__":
    main()
