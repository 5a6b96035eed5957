"""Framework overhead: the same LM training step in a plain PyTorch loop and through lightning-rlm.

Both sides train the same network (GRU on Tiny Shakespeare chars, tiny Llama on TinyStories BPE) from the
same initial weights, on the same batches, with the same AdamW settings and gradient clipping. Time is
measured over the steps after a warm-up, between the start and the end of the timed steps (data loading
included on both sides). Overhead above 10% is a bug to find.

    python benchmarks/lm_overhead.py [--steps 40] [--warmup 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F

from lightning_rlm.data import LMWindowDataModule, TextSource
from lightning_rlm.methods import LanguageModel
from lightning_rlm.models import GRULanguageModel, HFCausalLM

LLAMA = dict(model_type="llama", hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)


def setups():
    yield ("GRU 2x256, char, 64x128",
           LMWindowDataModule(TextSource(preset="shakespeare"), block_size=128, batch_size=64),
           lambda v: GRULanguageModel(v, 256, 256, 2), 3e-3)
    yield ("tiny Llama 2.75M, BPE 2048, 16x256",
           LMWindowDataModule(TextSource(preset="tinystories"), tokenizer="bpe", block_size=256, batch_size=16),
           lambda v: HFCausalLM(v, config=LLAMA), 2e-3)


def plain_loop(net, loader, steps: int, warmup: int, lr: float) -> float:
    """tokens/s of a hand-written loop: forward, cross-entropy, backward, clip, AdamW step."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    net.train()
    it = iter(loader)
    tokens, t0 = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        batch = next(it)
        logits = net(batch["input_ids"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step >= warmup:
            tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - t0)


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1, self.tokens = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.tokens += batch["input_ids"].numel()
            self.t1 = time.perf_counter()


def through_framework(net, dm, steps: int, warmup: int, lr: float) -> float:
    lm = LanguageModel(network=lambda v: net, vocab_size=net_vocab(net), lr=lr, sample_every_n_steps=0)
    timer = StepTimer(warmup)
    trainer = L.Trainer(max_steps=warmup + steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[timer])
    trainer.fit(lm, datamodule=dm)
    return timer.tokens / (timer.t1 - timer.t0)


def net_vocab(net) -> int:
    return net.vocab_size if hasattr(net, "vocab_size") else net.model.config.vocab_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for name, dm, make_net, lr in setups():
        dm.setup("fit")
        torch.manual_seed(0)
        net0 = make_net(dm.tokenizer.vocab_size)
        plain, ours = [], []
        for _ in range(args.repeats):  # alternate, so drift in machine load hits both sides
            torch.manual_seed(0)
            plain.append(plain_loop(copy.deepcopy(net0), dm.train_dataloader(), args.steps, args.warmup, lr))
            torch.manual_seed(0)
            ours.append(through_framework(copy.deepcopy(net0), dm, args.steps, args.warmup, lr))
        p, o = statistics.median(plain), statistics.median(ours)
        rows.append((name, p, o, (p - o) / p * 100))
    print("\n| model | plain PyTorch tokens/s | lightning-rlm tokens/s | overhead |\n|---|---|---|---|")
    for name, p, o, ov in rows:
        print(f"| {name} | {p:,.0f} | {o:,.0f} | {ov:+.1f}% |")
    print(f"\n(median of {args.repeats} alternating repeats, {args.steps} timed steps after {args.warmup} warm-up, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
