"""Next-token language modelling: the NLL baseline every method is compared with.

Trains any network that maps token ids [B, T] to logits [B, T, V] — the GRU LM or a Hugging Face causal
LM — with cross-entropy on the next token. The network is injected as a callable that takes the vocab
size, so the vocabulary comes from the DataModule's tokenizer rather than from the config. Logs train/val
loss, perplexity, bits per char (char tokenizers), learning rate and tokens/s, and every
`sample_every_n_steps` a sampled continuation as TensorBoard text. HF networks are also exported with
`save_pretrained` (model + tokenizer) at the end of fit: that folder is the base policy of the RL methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_rlm.checks import check_positive
from lightning_rlm.logging_utils import log_text
from lightning_rlm.methods.token_window import TokenWindowSteps, VocabFromData
from lightning_rlm.models.exportable import ExportableLM
from lightning_rlm.models.gru_lm import GRULanguageModel
from lightning_rlm.models.hf import HFCausalLM


def default_network(vocab_size: int) -> nn.Module:
    return GRULanguageModel(vocab_size)


class LanguageModel(VocabFromData, TokenWindowSteps, L.LightningModule):
    """Next-token NLL training for a GRU or Hugging Face causal LM.

    Args:
        network: callable `vocab_size -> nn.Module` (in YAML: a class_path such as
            `lightning_rlm.models.GRULanguageModel` or `lightning_rlm.models.HFCausalLM` with its init_args).
        vocab_size: set from the DataModule's tokenizer when None.
        lr, weight_decay, betas: AdamW settings.
        warmup_steps, lr_schedule, min_lr_ratio: linear warmup then constant or cosine decay.
        sample_every_n_steps: log a sampled continuation every N steps (0: never).
        sample_prompt: text to continue (None: the start of the first validation window).
        sample_tokens, sample_temperature: length and temperature of the sample.
        export_dir: where HF networks are saved at the end of fit (None: `<log_dir>/hf`).
    """

    def __init__(
        self,
        network: Callable[[int], nn.Module] = default_network,
        vocab_size: Optional[int] = None,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        sample_every_n_steps: int = 200,
        sample_prompt: Optional[str] = None,
        sample_tokens: int = 200,
        sample_temperature: float = 0.8,
        export_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_positive(lr=lr)
        self.save_hyperparameters(ignore=["network"])
        self.network_fn = network
        self.net: Optional[nn.Module] = None
        self._sampled_at = -1  # global step of the last logged sample
        if vocab_size is not None:
            self._build(vocab_size)

    # ----- model -----------------------------------------------------------------------------------------
    def make_net(self, vocab_size: int) -> nn.Module:
        return self.network_fn(vocab_size)

    def setup(self, stage: str) -> None:  # the network is built later, in `configure_model`
        prompt = self.hparams.sample_prompt
        if prompt is not None and self.tokenizer is not None:
            try:  # before training, not when the first sample is due
                self.tokenizer.encode(prompt)
            except ValueError as e:
                raise ValueError(f"model.init_args.sample_prompt={prompt!r}: {e}; use text the tokenizer "
                                 "can encode (for a char vocabulary, characters of the corpus)") from None

    def downstream_lms(self) -> dict[str, tuple[nn.Module, Any]]:
        """The LM that downstream evaluation scores (:mod:`lightning_rlm.callbacks.downstream`): the network,
        when it is a Hugging Face causal LM with a Hugging Face tokenizer (not the GRU or char baselines)."""
        if not hasattr(self.net, "generate") or getattr(self.tokenizer, "hf", None) is None:
            raise ValueError(f"evaluation.tasks: the {type(self.net).__name__} network with a "
                             f"{type(self.tokenizer).__name__} cannot answer downstream tasks; use an HF causal "
                             "LM network (lightning_rlm.models.hf) with an HF tokenizer")
        return {"": (self.net, self.tokenizer)}

    def exportable_lm(self, adapter_mode: Optional[str] = None) -> ExportableLM:
        """What `lightning-rlm export` writes: the HF causal LM inside an `HFCausalLM` network (the GRU LM has
        no Hugging Face form); its tokenizer is the DataModule's (the export takes the one the run saved)."""
        if not isinstance(self.net, HFCausalLM):
            raise ValueError(f"the {type(self.net).__name__} network is not a Hugging Face model; only "
                             "HFCausalLM networks (lightning_rlm.models.HFCausalLM) can be exported")
        return ExportableLM(self.net.model, getattr(self.tokenizer, "hf", None), description="the network")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids)  # [B, T, V]

    def nll(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["input_ids"])  # [B, T, V]
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())

    # ----- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.nll(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch mean under DDP
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_train_batch_end(self, outputs, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log_throughput(batch)
        every = self.hparams.sample_every_n_steps
        if every and self.trainer.global_step % every == 0:
            self.log_sample()

    def _eval_step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        loss = self.nll(batch)
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{split}/ppl", torch.exp(loss), sync_dist=True)
        if getattr(self.tokenizer, "is_char", False):
            self.log(f"{split}/bits_per_char", loss / math.log(2), sync_dist=True)
        return loss

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[str]:
        """Continue the first quarter of each window; returns the decoded continuations."""
        ids = batch["input_ids"]
        prompt = ids[:, : max(1, ids.size(1) // 4)]
        new = self.net.generate(prompt, max_new_tokens=self.hparams.sample_tokens,
                                temperature=self.hparams.sample_temperature)
        return [self.tokenizer.decode(row) for row in new]

    # ----- samples and export -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_text(self, prompt: Optional[str] = None, max_new_tokens: Optional[int] = None) -> tuple[str, str]:
        """Continue `prompt` (default: the start of the first val window); returns (prompt, continuation)."""
        tok = self.tokenizer
        if prompt is None:
            prompt = self.hparams.sample_prompt
        if prompt is None:
            dm = self.trainer.datamodule
            prompt_ids = dm.val_set[0]["input_ids"][:32].tolist()
        else:
            prompt_ids = tok.encode(prompt)
        was_training = self.training
        self.eval()
        ids = torch.tensor([prompt_ids], device=self.device)
        new = self.net.generate(ids, max_new_tokens or self.hparams.sample_tokens,
                                temperature=self.hparams.sample_temperature)
        self.train(was_training)
        return tok.decode(prompt_ids), tok.decode(new[0])

    def log_sample(self) -> None:
        if not self.trainer.is_global_zero or self.tokenizer is None or self._sampled_at == self.trainer.global_step:
            return  # (the end of fit after a step that already logged its sample logs none)
        self._sampled_at = self.trainer.global_step
        prompt, cont = self.sample_text()
        text = f"**{prompt}**{cont}"
        log_text(self, "samples", text.replace("\n", "  \n"))  # two trailing spaces keep markdown line breaks

    def on_fit_end(self) -> None:
        self.log_sample()
        if not isinstance(self.net, HFCausalLM) or not self.trainer.is_global_zero:
            return
        log_dir = self.logger.log_dir if self.logger is not None else None
        out = self.hparams.export_dir or (Path(log_dir) / "hf" if log_dir else None)
        if out is None:
            rank_zero_info("no logger and no export_dir: the HF model is not exported")
            return
        self.net.save_pretrained(out, getattr(self.tokenizer, "hf", None))
        rank_zero_info(f"exported the HF model and tokenizer to {out}")
