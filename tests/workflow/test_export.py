"""`lightning-rlm export` for every method that trains an LM: a tiny fit on the tiny random Llama, the trained
weights moved well away from the base (a 1-step update is too small to tell a wrong export from a right one),
a checkpoint, the export, and the folder loaded with `AutoModelForCausalLM` / `PeftModel`: its logits equal
the trained policy's (in the exported adapter mode) and differ from the base model's and the other modes'.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_rlm.cli import RLMCLI
from lightning_rlm.main import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 250, 17, 64]])  # token ids inside the tiny vocab (512)
COMMON = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
          "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
          "--trainer.callbacks=[]"]
RL = ["--model.init_args.max_completion_length=6", "--model.init_args.num_generations=2"]


def fit(tmp_path: Path, config: str, model_dir: Path, *extra: str) -> RLMCLI:
    return RLMCLI(args=["fit", "--config", str(CONFIGS / config),
                        "--model.init_args.model_name_or_path", str(model_dir),
                        "--data.init_args.tokenizer", str(model_dir),
                        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *COMMON, *extra])


def trained_checkpoint(cli: RLMCLI, select: Callable[[str, nn.Parameter], bool] = lambda n, p: p.requires_grad,
                       scale: float = 0.05) -> Path:
    """Move the selected parameters by `scale` noise and save the method (a checkpoint in the run's folder)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moved = [p.add_(torch.randn(p.shape, generator=g) * scale) for n, p in cli.model.named_parameters()
                 if select(n, p)]
    assert moved
    path = Path(cli.trainer.log_dir) / "checkpoints" / "trained.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


def export(ckpt: Path, out: Path, *flags: str) -> dict:
    assert main(["export", "--ckpt_path", str(ckpt), "--out", str(out), *flags]) is None
    return json.loads((out / "EXPORT.json").read_text())


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=IDS).logits.float()


def hf(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder))


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() <= 1e-5, (a - b).abs().max().item()


def assert_differ(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() > 1e-3  # the export would be caught if it lost the training


def refuse(capsys, *args: str) -> str:
    """Run `export` expecting bad input: exit 2 and one line on stderr, returned."""
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as e:
        main(["export", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-rlm: error: "), err
    return err[0]


# ----- GRPO: full fine-tuning and LoRA (adapter folder and merged) ---------------------------------------------
def test_grpo_full_fine_tuning(tmp_path, tiny_llama_dir):
    cli = fit(tmp_path, "grpo/sentence_length_10_smooth.yaml", tiny_llama_dir, *RL)
    ckpt = trained_checkpoint(cli, lambda n, p: n.startswith("policy.") and p.requires_grad)
    record = export(ckpt, tmp_path / "out")
    assert record["format"] == "hf" and not record["merged"] and record["global_step"] == 1
    assert record["method"] == "lightning_rlm.methods.grpo.GRPO" and record["checkpoint"] == str(ckpt.resolve())
    out = logits(hf(tmp_path / "out"))
    assert_same(out, logits(cli.model.policy))
    assert_differ(out, logits(hf(tiny_llama_dir)))


@pytest.fixture(scope="module")
def grpo_lora(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("grpo_lora")
    cli = fit(tmp, "grpo/lora_r8_lr1e-4.yaml", tiny_llama_dir, *RL, "--model.init_args.lora_rank=2")
    return cli, trained_checkpoint(cli)


def test_grpo_lora_as_peft_adapter_and_merged(tmp_path, grpo_lora, tiny_llama_dir):
    from peft import PeftModel

    cli, ckpt = grpo_lora
    trained = logits(cli.model.policy)
    record = export(ckpt, tmp_path / "adapter")
    assert record["format"] == "peft_adapter" and not record["merged"] and record["base_model"] == str(tiny_llama_dir)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_llama_dir)  # where PEFT finds the base
    peft = PeftModel.from_pretrained(hf(adapter_config["base_model_name_or_path"]), str(tmp_path / "adapter"))
    assert_same(logits(peft), trained)
    assert_differ(trained, logits(hf(tiny_llama_dir)))

    record = export(ckpt, tmp_path / "merged", "--merge")
    assert record["format"] == "hf" and record["merged"]
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert_same(logits(hf(tmp_path / "merged")), trained)


# ----- the two-adapter methods: always merged, in the chosen mode ----------------------------------------------
def test_gradient_routing_exports_retain_only_by_default(tmp_path, tiny_llama_dir):
    cli = fit(tmp_path, "gradient_routing/routing_r4.yaml", tiny_llama_dir, *RL,
              "--model.init_args.retain_rank=2", "--model.init_args.forget_rank=2")
    ckpt = trained_checkpoint(cli)  # retain and forget A, B
    policy = cli.model.policy
    with policy.adapters("retain_only"):
        retain_only = logits(policy)
    with policy.adapters("both"):
        both = logits(policy)
    record = export(ckpt, tmp_path / "deployed")
    assert record["adapter_mode"] == "retain_only" and record["merged"] and record["adapters"] == "DualLoRAModel"
    out = logits(hf(tmp_path / "deployed"))
    assert_same(out, retain_only)
    assert_differ(out, both)  # the forget adapter was ablated, not kept
    assert_differ(out, logits(hf(tiny_llama_dir)))

    export(ckpt, tmp_path / "both", "--adapter_mode", "both")
    assert_same(logits(hf(tmp_path / "both")), both)


def test_projected_grpo_exports_no_hack_by_default(tmp_path, tiny_llama_dir):
    cli = fit(tmp_path, "projected_grpo/route.yaml", tiny_llama_dir, *RL,
              "--model.init_args.svd_cache_dir", str(tmp_path / "svd"),
              "--model.init_args.hack_cache_dir", str(tmp_path / "hack"), "--model.init_args.hack_pairs=2")
    ckpt = trained_checkpoint(cli, lambda n, p: "delta_s" in n)  # δS and δS_hack
    policy = cli.model.policy
    with policy.adapters("no_hack"):
        no_hack = logits(policy)
    with policy.adapters("both"):
        both = logits(policy)
    record = export(ckpt, tmp_path / "deployed")
    assert record["adapter_mode"] == "no_hack" and record["merged"] and record["adapters"] == "SVDAdapterModel"
    out = logits(hf(tmp_path / "deployed"))
    assert_same(out, no_hack)
    assert_differ(out, both)
    assert_differ(out, logits(hf(tiny_llama_dir)))

    export(ckpt, tmp_path / "hack_only", "--adapter_mode", "hack_only")
    with policy.adapters("hack_only"):
        assert_same(logits(hf(tmp_path / "hack_only")), logits(policy))


# ----- GAN-RL, SFT with a KL barrier, Quiet-STaR, the LM baseline ----------------------------------------------
def test_gan_rl_exports_the_generator_only(tmp_path, tiny_llama_dir):
    from peft import PeftModel

    cli = fit(tmp_path, "gan_rl/00_tinystories.yaml", tiny_llama_dir, "--model.init_args.lora_rank=2",
              "--model.init_args.reasoning_tokens=3", "--model.init_args.completion_tokens=3",
              "--data.init_args.completion_tokens=3", "--data.init_args.prefix_tokens=8",
              "--data.init_args.batch_size=2", "--data.init_args.source.max_documents=40")
    ckpt = trained_checkpoint(cli, lambda n, p: n.startswith("policy.") and p.requires_grad)
    record = export(ckpt, tmp_path / "out")
    assert record["format"] == "peft_adapter" and "discriminator" in record["exported"]
    peft = PeftModel.from_pretrained(hf(tiny_llama_dir), str(tmp_path / "out"))
    trained = logits(cli.model.policy)
    assert_same(logits(peft), trained)
    assert_differ(trained, logits(hf(tiny_llama_dir)))
    assert not any("d_head" in p.name for p in (tmp_path / "out").iterdir())


@pytest.mark.parametrize("config", ["separate_05_tinystories", "reasoning_disc_separate_05_tinystories"])
def test_gan_rl_with_separate_adapters_exports_the_generator_only(tmp_path, tiny_llama_dir, config):
    from peft import PeftModel

    cli = fit(tmp_path, f"gan_rl/{config}.yaml", tiny_llama_dir, "--model.init_args.lora_rank=2",
              "--model.init_args.reasoning_tokens=3", "--model.init_args.completion_tokens=3",
              "--data.init_args.completion_tokens=3", "--data.init_args.prefix_tokens=8",
              "--data.init_args.batch_size=2", "--data.init_args.source.max_documents=40",
              *(["--model.init_args.d_reasoning_tokens=2"] if "reasoning" in config else []))
    assert sorted(cli.model.policy.peft_config) == ["default", "discriminator"]
    ckpt = trained_checkpoint(cli, lambda n, p: n.startswith("policy.") and p.requires_grad)  # both adapters
    policy = cli.model.policy
    trained = logits(policy)
    with cli.model._discriminator_adapter():
        discriminator = logits(policy)
    assert_differ(trained, discriminator)

    record = export(ckpt, tmp_path / "out")
    assert record["format"] == "peft_adapter" and "head and adapter left out" in record["exported"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == []  # no discriminator/ folder
    peft = PeftModel.from_pretrained(hf(tiny_llama_dir), str(tmp_path / "out"))
    assert list(peft.peft_config) == ["default"]
    assert_same(logits(peft), trained)
    assert_differ(trained, logits(hf(tiny_llama_dir)))

    export(ckpt, tmp_path / "merged", "--merge")  # the generator folded in, the discriminator's adapter dropped
    assert_same(logits(hf(tmp_path / "merged")), trained)


def test_sft_kl_barrier_lora_merged_keeps_the_chat_template(tmp_path, tiny_chat_llama_dir):
    from transformers import AutoTokenizer

    cli = fit(tmp_path, "sft_kl_barrier/kl_rev_rmse.yaml", tiny_chat_llama_dir, "--model.init_args.lora_rank=2",
              "--model.init_args.n_rounds=1", "--model.init_args.eval_prompts=2",
              "--model.init_args.eval_max_new_tokens=2", "--model.init_args.eval_at_start=false",
              "--data.init_args.source.max_documents=300", "--data.init_args.batch_size=2")
    ckpt = trained_checkpoint(cli)
    record = export(ckpt, tmp_path / "out", "--merge")
    assert record["format"] == "hf" and record["merged"] and record["adapters"] == "peft_lora"
    out = logits(hf(tmp_path / "out"))
    assert_same(out, logits(cli.model.policy))
    assert_differ(out, logits(hf(tiny_chat_llama_dir)))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.chat_template == AutoTokenizer.from_pretrained(str(tiny_chat_llama_dir)).chat_template
    assert tok.chat_template and "<|im_start|>" in tok.get_vocab()


def test_quiet_star_exports_the_lm_and_its_thought_state(tmp_path, tiny_llama_dir):
    from lightning_rlm.models.quiet_star_lm import QuietStarLM

    cli = fit(tmp_path, "quiet_star/llama_tinystories.yaml", tiny_llama_dir, "--data.init_args.block_size=16",
              "--data.init_args.batch_size=2", "--model.init_args.think_positions=4",
              "--model.init_args.sample_every_n_steps=0", "--model.init_args.sample_prompt=null",
              "--data.init_args.source.max_documents=100")
    ckpt = trained_checkpoint(cli)  # the LM, the markers and the mixing head
    record = export(ckpt, tmp_path / "out")
    assert record["extras"] == ["quiet_star.pt"] and record["format"] == "hf"
    out = logits(hf(tmp_path / "out"))
    assert_same(out, logits(cli.model.net.lm))
    assert_differ(out, logits(hf(tiny_llama_dir)))
    net, again = cli.model.net, QuietStarLM.from_export(tmp_path / "out")
    for which in ("start", "end"):
        assert torch.equal(again.marker(which), net.marker(which))
    for p, q in zip(net.mixing_head.parameters(), again.mixing_head.parameters()):
        assert torch.equal(p, q)
    state = torch.load(tmp_path / "out" / "quiet_star.pt", weights_only=True)
    assert state["thinking"]["n_ahead"] == cli.model.hparams.n_ahead


def test_language_model_takes_the_runs_tokenizer(tmp_path, tiny_llama_dir):
    override = tmp_path / "tiny_lm.yaml"
    override.write_text(f"model:\n  init_args:\n    network:\n      class_path: lightning_rlm.models.HFCausalLM\n"
                        f"      init_args:\n        config: null\n        name_or_path: {tiny_llama_dir}\n"
                        f"data:\n  init_args:\n    tokenizer: {tiny_llama_dir}\n    block_size: 16\n"
                        f"    batch_size: 2\n    source:\n      preset: tinystories\n      max_documents: 100\n")
    cli = RLMCLI(args=["fit", "--config", str(CONFIGS / "lm/llama_tinystories.yaml"), "--config", str(override),
                       "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                       "--model.init_args.sample_every_n_steps=0", "--model.init_args.sample_tokens=2", *COMMON])
    ckpt = trained_checkpoint(cli)
    assert (Path(cli.trainer.log_dir) / "tokenizer").is_dir()  # the DataModule's, saved with the run
    export(ckpt, tmp_path / "out")
    out = logits(hf(tmp_path / "out"))
    assert_same(out, logits(cli.model.net.model))
    assert_differ(out, logits(hf(tiny_llama_dir)))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).encode("Once upon a time") == \
        AutoTokenizer.from_pretrained(str(tiny_llama_dir)).encode("Once upon a time")


# ----- bad input: one line, exit code 2, nothing written -------------------------------------------------------
def test_a_non_empty_out_is_refused_without_force(tmp_path, grpo_lora, capsys, monkeypatch):
    _, ckpt = grpo_lora
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = refuse(capsys, "--ckpt_path", str(ckpt), "--out", str(out))
    assert str(out) in line and "--force" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left either

    export(ckpt, out, "--force")  # replaces the folder
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").is_file()
    monkeypatch.chdir(out)  # but never the working folder
    assert "working folder" in refuse(capsys, "--ckpt_path", str(ckpt), "--out", ".", "--force")
    assert (out / "adapter_config.json").is_file()


def test_a_missing_or_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no" / "last.ckpt"
    line = refuse(capsys, "--ckpt_path", str(missing), "--out", str(tmp_path / "out"))
    assert str(missing) in line and "no such file" in line
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    line = refuse(capsys, "--ckpt_path", str(bad), "--out", str(tmp_path / "out"))
    assert str(bad) in line and "not a readable checkpoint" in line
    assert not (tmp_path / "out").exists()


def test_methods_and_modes_that_cannot_be_exported(tmp_path, grpo_lora, capsys):
    _, ckpt = grpo_lora
    line = refuse(capsys, "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out"), "--adapter_mode", "both")
    assert "GRPO has no adapter modes" in line
    gru = tmp_path / "gru.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "lightning_rlm.methods.QuietStarGRU"}, "state_dict": {}}, gru)
    line = refuse(capsys, "--ckpt_path", str(gru), "--out", str(tmp_path / "out"))
    assert "QuietStarGRU trains no Hugging Face language model" in line
    assert not (tmp_path / "out").exists()
