"""Training throughput of Quiet-STaR GRU models against the base GRU LM, on the same batch.

Every position samples `trice_samples` thoughts of `max_reasoning_len` tokens (fixed length here, so the
count is exact) and the interpreter reads them plus the end-of-thought token. In GRU steps per position:

    base LM:    1
    reasoning:  (context passes) + K * (L + 1) * (1 if reasoner and interpreter share weights else 2)

which is 1 + K (L + 1) for one shared model ("AAAA"), the multiple we expect at equal widths. The table
shows the measured multiple (base tokens/s over reasoning tokens/s) next to it, and whether the measured
multiple is within 1.5x of the theory either way (1/1.5 <= measured/theory <= 1.5).

The theory prices every GRU step alike, which holds only when every step is compute-bound. The defaults
(width 256, batch 128 x 64) are such a regime. With small batches or widths the base LM steps B rows at a
time through T sequential steps (latency-bound) while a thought step advances B*T*K rows at once, so the
measured multiple falls well below the theory (e.g. --hidden 32 --batch 16 gives 0.3-0.7 of it): thoughts
are then cheaper than the step count says. Heads, sampling and thought-token bookkeeping are not in the
theory; they are what pushes the measured multiple above it in the compute-bound regime.

    python benchmarks/quiet_star_gru_throughput.py [--hidden 256] [--batch 128] [--block 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_rlm.data import LMWindowDataModule, TextSource
from lightning_rlm.methods import QuietStarGRU

SETUPS = [  # (weight_groups, trice_samples, max_reasoning_len)
    ("AAAA", 2, 2),
    ("AAAA", 4, 4),
    ("AAAA", 4, 8),
    ("ABCD", 4, 4),
]


def train_tokens_per_s(model: QuietStarGRU, batch: dict[str, torch.Tensor], steps: int, warmup: int) -> float:
    """tokens/s of full training steps: forward (thoughts included), backward, clipping, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        loss = model.compute_losses(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return batch["input_ids"].numel() * steps / (time.perf_counter() - t0)


def theoretical_multiple(net, K: int, L: int) -> float:
    """GRU steps per position of the reasoning model over the base LM's one (equal widths)."""
    context_passes = len({(net.embed_key[r], net.gru_key[r]) for r in net.roles})
    shared = net.gru_key["reasoner"] == net.gru_key["interpreter"] and (
        net.embed_key["reasoner"] == net.embed_key["interpreter"])
    return context_passes + K * (L + 1) * (1 if shared else 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="width of every GRU")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    dm = LMWindowDataModule(TextSource(preset="shakespeare"), block_size=args.block, batch_size=args.batch)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    vocab = dm.tokenizer.vocab_size
    H = args.hidden
    base = QuietStarGRU(vocab_size=vocab, use_reasoner=False, base_lm_hidden_dim=H)
    base_tps = train_tokens_per_s(base, batch, args.steps, args.warmup)

    print(f"GRU width {H}, batch {args.batch}x{args.block}, {torch.get_num_threads()} threads, "
          f"device cpu; base LM: {base_tps:,.0f} train tokens/s")
    header = (f"| {'groups':6} | {'K':>2} | {'L':>2} | {'tokens/s':>9} | {'measured x':>10} | {'theory x':>8} | "
              f"{'meas/theory':>11} | within 1.5x |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for groups, K, L in SETUPS:
        torch.manual_seed(0)
        model = QuietStarGRU(vocab_size=vocab, base_lm_hidden_dim=H, reasoner_hidden_dim=H,
                             interpreter_hidden_dim=H, weight_groups=groups, trice_samples=K,
                             max_reasoning_len=L, variable_len=False, sample_every_n_steps=0)
        tps = train_tokens_per_s(model, batch, args.steps, args.warmup)
        measured, theory = base_tps / tps, theoretical_multiple(model.net, K, L)
        ratio = measured / theory
        ok = "yes" if 1 / 1.5 <= ratio <= 1.5 else "no"
        print(f"| {groups:6} | {K:>2} | {L:>2} | {tps:>9,.0f} | {measured:>10.1f} | {theory:>8.0f} | "
              f"{ratio:>11.2f} | {ok:>11} |")


if __name__ == "__main__":
    main()
