"""Quiet-STaR attention engines and thinking generation on a tiny Llama (CPU, fp32).

    python benchmarks/quiet_star_engines.py                      # the table in docs/quiet_star.md (about 15 minutes)
    python benchmarks/quiet_star_engines.py --lengths 128 --n-ahead 4 --gen-tokens 32   # a quick look

Training: one QuietStar step (thoughts at every position, forward + backward + AdamW) of `dense` vs
`diagonal` for each window length L and n_ahead, each in a fresh process so that its peak memory (peak RSS
during the step minus RSS before it) is its own; the last column counts what the thought attention alone
keeps for backward (the rest of the step's memory, MLPs, norms and logits of every thought token, is the
same for both engines). Generation: tokens/s of `QuietStarLM.generate` with the KV
cache against recomputing the whole prefix for every forward (`use_cache=False`).
Targets (issue #6): at L=512, n_ahead=16 diagonal >= 3x faster and >= 4x less peak memory than dense;
generate() >= 5x faster than recomputation at 256 generated tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LLAMA = {"model_type": "llama", "hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
         "tie_word_embeddings": True}
VOCAB = 2048


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train_child(length: int, n_ahead: int, engine: str, steps: int, batch: int, passes: int, n_talk: int) -> dict:
    import torch

    from lightning_rlm.methods import QuietStar

    torch.manual_seed(0)
    m = QuietStar(model_config=LLAMA, vocab_size=VOCAB, engine=engine, n_ahead=n_ahead, n_talk=n_talk,
                  n_passes=passes, lr=1e-4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (batch, length + 1), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        stats, _ = m.compute_losses(data, gen)
        stats["loss"].backward()
        opt.step()

    before = rss_bytes()
    step()  # the first step also allocates Adam's state; its peak is the step's peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "peak_mb": peak / 2**20,
            "attn_saved_mb": attention_saved_bytes(m, data) / 2**20}


def attention_saved_bytes(m, data) -> int:
    """Bytes the thought attention itself keeps for backward (one forward, counted by storage)."""
    import torch

    from lightning_rlm.models import thought_attention as ta

    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    inner = ta._thought_attention

    def counted(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return inner(*args, **kwargs)

    ta._thought_attention = counted
    try:
        m.compute_losses(data, torch.Generator().manual_seed(0))
    finally:
        ta._thought_attention = inner
    return sum(seen.values())


def generation(gen_tokens: int, n_ahead: int, prompt_len: int, repeats: int, batch: int) -> dict:
    import torch

    from lightning_rlm.methods import QuietStar

    torch.manual_seed(0)
    m = QuietStar(model_config=LLAMA, vocab_size=VOCAB, n_ahead=n_ahead).net.eval()
    prompt = torch.randint(0, VOCAB, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, kw in (("cache", {}), ("recompute", {"use_cache": False})):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m.generate(prompt, max_new_tokens=gen_tokens, n_ahead=n_ahead, generator=torch.Generator().manual_seed(0),
                       **kw)
            times.append(time.perf_counter() - t0)
        out[name] = batch * gen_tokens / statistics.median(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[128, 256, 512])
    p.add_argument("--n-ahead", type=int, nargs="*", default=[4, 8, 16])
    p.add_argument("--n-talk", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per config (after one untimed)")
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--gen-n-ahead", type=int, default=8)
    p.add_argument("--gen-repeats", type=int, default=1)
    p.add_argument("--gen-batch", type=int, nargs="+", default=[1, 8], help="prompts generated at once")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", nargs=3, metavar=("L", "N_AHEAD", "ENGINE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    if a.child:
        length, n_ahead, engine = int(a.child[0]), int(a.child[1]), a.child[2]
        print(json.dumps(train_child(length, n_ahead, engine, a.steps, a.batch, a.passes, a.n_talk)))
        return
    print(f"tiny Llama {LLAMA['hidden_size']}x{LLAMA['num_hidden_layers']}, vocab {VOCAB}, fp32, {a.threads} "
          f"thread(s); batch {a.batch} x {a.passes} thoughts, n_talk {a.n_talk}, thoughts at every position\n")
    print("| L | n_ahead | dense s/step | diagonal s/step | speed-up | dense peak MB | diagonal peak MB | "
          "memory ratio | attention saved MB, dense / diagonal |")
    print("|---|---|---|---|---|---|---|---|---|")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    for length in a.lengths:
        for n_ahead in a.n_ahead:
            res = {}
            for engine in ("dense", "diagonal"):
                cmd = [sys.executable, __file__, "--child", str(length), str(n_ahead), engine, "--steps", str(a.steps),
                       "--batch", str(a.batch), "--passes", str(a.passes), "--n-talk", str(a.n_talk),
                       "--threads", str(a.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    raise SystemExit(f"{engine} L={length} n_ahead={n_ahead} failed:\n{done.stderr[-2000:]}")
                res[engine] = json.loads(done.stdout.strip().splitlines()[-1])
            d, g = res["dense"], res["diagonal"]
            print(f"| {length} | {n_ahead} | {d['step_s']:.3f} | {g['step_s']:.3f} | {d['step_s'] / g['step_s']:.2f}x | "
                  f"{d['peak_mb']:.0f} | {g['peak_mb']:.0f} | {d['peak_mb'] / max(g['peak_mb'], 1e-9):.2f}x | "
                  f"{d['attn_saved_mb']:.0f} / {g['attn_saved_mb']:.0f} |", flush=True)
    if a.gen_tokens:
        print(f"\ngeneration, {a.gen_tokens} tokens after a 16-token prompt, n_ahead {a.gen_n_ahead} "
              f"(tokens/s over all prompts; recompute = no KV cache, every forward over the whole sequence):")
        print("| prompts | generate() with KV cache (fork, think, roll back) | recompute | speed-up |\n|---|---|---|---|")
        for batch in a.gen_batch:
            r = generation(a.gen_tokens, a.gen_n_ahead, 16, a.gen_repeats, batch)
            print(f"| {batch} | {r['cache']:.1f} | {r['recompute']:.1f} | {r['cache'] / r['recompute']:.1f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
