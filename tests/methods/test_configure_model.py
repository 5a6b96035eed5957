"""Methods create their models in `configure_model`, not in `__init__` (issue 17).

Construction reads the tokenizer, the stop ids and the config (cheap) and validates the arguments; the policy,
its reference, adapters and heads are created by `configure_model`, which Lightning calls in the strategy's
context (`fit`, `validate`, `predict`, `load_from_checkpoint`), maybe more than once (a no-op after the first).
HF `from_pretrained` refuses to run under a meta-device context, so `configure_model` cannot build a pretrained
policy on the meta device; `trainer.init_module(empty_init=True)` around the construction is harmless (nothing
is built there) and `fit` then loads the real weights.

The token-window methods (LM baseline, Quiet-STaR, GRU Quiet-STaR) build their network in `configure_model` too,
sized to the DataModule's tokenizer, which is known there (Lightning calls `setup` first); a network from a config
can be created on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_rlm.data import LMWindowDataModule, TextSource
from lightning_rlm.data.collate import pad_left, pad_right
from lightning_rlm.methods import (
    GANRL,
    GRPO,
    GradientRouting,
    LanguageModel,
    ProjectedGRPO,
    QuietStar,
    QuietStarGRU,
    SFTKLBarrier,
    gan_rl,
    grpo,
    sft_kl_barrier,
)
from lightning_rlm.methods.gan_rl import PLAIN_PROMPT_TEMPLATE
from lightning_rlm.models import hf
from lightning_rlm.models.gru_lm import GRULanguageModel
from lightning_rlm.models.hf import load_policy

PROMPTS = ["Once upon a time", "The dog ran"]
TRUTHS = [" there was a cat.", " to the park."]
GRPO_KW = dict(num_generations=2, max_completion_length=4, eval_prompt=None)

MAKERS: dict[str, Callable[[Path, Path], L.LightningModule]] = {
    "grpo": lambda d, tmp: GRPO(model_name_or_path=str(d), **GRPO_KW),
    "grpo_lora": lambda d, tmp: GRPO(model_name_or_path=str(d), lora_rank=2, **GRPO_KW),
    "gradient_routing": lambda d, tmp: GradientRouting(model_name_or_path=str(d), retain_rank=2, forget_rank=1,
                                                       **GRPO_KW),
    "projected_grpo": lambda d, tmp: ProjectedGRPO(model_name_or_path=str(d), svd_cache_dir=str(tmp / "svd"),
                                                   hack_cache_dir=str(tmp / "hack"), eval_modes=("both",),
                                                   hack_pairs=2, **GRPO_KW),
    "sft_kl_barrier": lambda d, tmp: SFTKLBarrier(model_name_or_path=str(d), n_rounds=1, eval_prompts=2,
                                                  eval_max_new_tokens=4, eval_at_start=False),
    "gan_rl": lambda d, tmp: GANRL(model_name_or_path=str(d), lora_rank=2, reasoning_tokens=2, completion_tokens=3,
                                   prompt_template=PLAIN_PROMPT_TEMPLATE, write_rollouts=False),
}
BIG = ("policy", "ref_model", "d_head", "value_head")  # the modules configure_model creates


def batches(name: str, tokenizer: Any) -> list[dict[str, Any]]:
    if name == "gan_rl":
        return [{"prefix": PROMPTS, "completion": TRUTHS}]
    ids, mask = pad_left([tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS], tokenizer.pad_token_id)
    batch = {"prompt": PROMPTS, "prompt_ids": ids, "prompt_mask": mask}
    if name == "sft_kl_barrier":
        cids, cmask = pad_right([tokenizer.encode(c, add_special_tokens=False) for c in TRUTHS],
                                tokenizer.pad_token_id)
        batch |= {"completion_ids": cids, "completion_mask": cmask}
    return [batch]


class _Data(L.LightningDataModule):
    def __init__(self, batches: list[dict[str, Any]]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)


def trainer(tmp_path: Path, **kw: Any) -> L.Trainer:
    return L.Trainer(**{"max_steps": 1, "accelerator": "cpu", "devices": 1, "logger": False,
                        "default_root_dir": tmp_path, "enable_checkpointing": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0, **kw})


@pytest.mark.parametrize("name", list(MAKERS))
def test_construction_loads_no_weights(name, tiny_llama_dir, tmp_path, monkeypatch):
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights loaded in __init__")

    for module in (grpo, sft_kl_barrier, gan_rl):
        monkeypatch.setattr(module, "load_causal_lm", refuse)
    m = MAKERS[name](tiny_llama_dir, tmp_path)
    assert all(getattr(m, attr, None) is None for attr in BIG)
    assert not list(m.parameters())
    _, tokenizer, eos = load_policy(str(tiny_llama_dir))  # the tokenizer and stop ids are those of load_policy
    assert m.eos_token_id == eos and m.tokenizer.pad_token_id == tokenizer.pad_token_id
    with pytest.raises(AssertionError, match="weights loaded"):
        m.configure_model()


@pytest.mark.parametrize("name", list(MAKERS))
def test_configure_model_twice_is_a_no_op(name, tiny_llama_dir, tmp_path):
    m = MAKERS[name](tiny_llama_dir, tmp_path)
    m.configure_model()
    modules = {attr: getattr(m, attr, None) for attr in BIG}
    assert modules["policy"] is not None
    assert (modules["ref_model"] is not None) == (name in ("grpo", "sft_kl_barrier"))  # full FT: a frozen copy
    params = [id(p) for p in m.parameters()]
    m.configure_model()
    assert all(getattr(m, attr, None) is module for attr, module in modules.items())
    assert [id(p) for p in m.parameters()] == params


def test_from_pretrained_refuses_the_meta_device(tiny_llama_dir, tmp_path):
    m = MAKERS["grpo"](tiny_llama_dir, tmp_path)
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta"):
        m.configure_model()


def test_empty_init_construction_then_fit_loads_the_real_weights(tiny_llama_dir, tmp_path):
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path)
    with t.init_module(empty_init=True):
        m = MAKERS["grpo_lora"](tiny_llama_dir, tmp_path)
    assert m.policy is None
    t.fit(m, datamodule=_Data(batches("grpo", m.tokenizer)))
    assert t.global_step == 1
    base, _, _ = load_policy(str(tiny_llama_dir))
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in m.policy.named_parameters() if not p.requires_grad}
    assert frozen and all(torch.equal(frozen[n], p) for n, p in base.named_parameters())


@pytest.mark.parametrize("name", ["grpo_lora", "gradient_routing", "sft_kl_barrier", "gan_rl"])
def test_load_from_checkpoint_round_trips(name, tiny_llama_dir, tmp_path):
    L.seed_everything(0, verbose=False)
    m = MAKERS[name](tiny_llama_dir, tmp_path)
    t = trainer(tmp_path)
    t.fit(m, datamodule=_Data(batches(name, m.tokenizer)))
    t.save_checkpoint(tmp_path / "m.ckpt")
    again = type(m).load_from_checkpoint(tmp_path / "m.ckpt", weights_only=False)
    assert again.policy is not None
    want, got = m.state_dict(), again.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# ----- token-window methods -----------------------------------------------------------------------------------
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
WINDOW_MAKERS: dict[str, Callable[[], L.LightningModule]] = {
    "language_model": lambda: LanguageModel(network=lambda v: GRULanguageModel(v, embed_dim=8, hidden_size=16,
                                                                               num_layers=1)),
    "quiet_star": lambda: QuietStar(model_config=TINY_LLAMA, n_ahead=3, n_talk=1, n_passes=2, think_positions=2),
    "quiet_star_gru": lambda: QuietStarGRU(embed_dim=8, base_lm_hidden_dim=16, reasoner_hidden_dim=16,
                                           interpreter_hidden_dim=16, max_reasoning_len=2),
}


def windows() -> LMWindowDataModule:
    return LMWindowDataModule(TextSource(preset="shakespeare"), block_size=16, batch_size=2)


class _NetAtSetup(L.Callback):
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.net = pl_module.net


@pytest.mark.parametrize("name", list(WINDOW_MAKERS))
def test_window_methods_build_their_network_in_configure_model(name, tmp_path):
    L.seed_everything(0, verbose=False)
    m = WINDOW_MAKERS[name]()
    assert m.net is None and not list(m.parameters())
    spy, dm = _NetAtSetup(), windows()
    t = trainer(tmp_path, callbacks=[spy])
    t.fit(m, datamodule=dm)
    assert spy.net is None  # not built by `setup`
    assert m.net is not None and t.global_step == 1
    assert m.hparams.vocab_size == dm.tokenizer.vocab_size
    net = m.net
    m.configure_model()
    assert m.net is net
    t.save_checkpoint(tmp_path / "m.ckpt")
    again = type(m).load_from_checkpoint(tmp_path / "m.ckpt", weights_only=False,
                                         **({"network": m.network_fn} if name == "language_model" else {}))
    want, got = m.state_dict(), again.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_quiet_star_network_from_a_config_can_be_created_on_the_meta_device(monkeypatch):
    dm = windows()
    dm.prepare_data()
    dm.setup("fit")
    m = WINDOW_MAKERS["quiet_star"]()
    monkeypatch.setattr(QuietStar, "tokenizer", property(lambda self: dm.tokenizer))
    with torch.device("meta"):
        m.configure_model()
    params = list(m.parameters())
    assert params and all(p.is_meta for p in params)


def test_pretrained_quiet_star_loads_its_weights_in_configure_model(tiny_llama_dir, monkeypatch):
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights loaded")

    with monkeypatch.context() as patch:
        patch.setattr(hf, "load_causal_lm", refuse)
        m = QuietStar(model_name_or_path=str(tiny_llama_dir), n_ahead=3, n_talk=1)
        assert m.net is None and not list(m.parameters())
        with pytest.raises(AssertionError, match="weights loaded"):
            m.configure_model()
    base, tokenizer, _ = load_policy(str(tiny_llama_dir))
    assert m.hparams.vocab_size == base.config.vocab_size and m.hf_tokenizer.pad_token_id == tokenizer.pad_token_id
    m.configure_model()
    net = m.net
    assert all(torch.equal(p, base.state_dict()[n]) for n, p in net.lm.state_dict().items())
    m.configure_model()
    assert m.net is net
