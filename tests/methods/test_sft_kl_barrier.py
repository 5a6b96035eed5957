"""SFT with a KL barrier on a tiny random Llama: rounds end to end, the loss, early stop, the data."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_rlm.cli import RLMCLI
from lightning_rlm.data import TextSource
from lightning_rlm.data.pairs import KeywordPrefixCompletionDataModule, PairsDataModule, keyword_pattern
from lightning_rlm.data.rounds import round_schedule
from lightning_rlm.methods import SFTKLBarrier

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NAMES = ["no_barrier", "kl_rev_mean", "kl_rev_rmse", "kl_fwd_rmse", "kl_rev_p95"]


def event_accumulator(log_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(next(log_dir.rglob("events.out.tfevents*")).parent))
    ea.Reload()
    return ea


def write_pairs(path: Path, n: int = 12) -> Path:
    rows = [{"prompt": f"Tom had {i} red balls.", "completion": " He was happy and played all day."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_dm(tmp_path: Path, model_dir: Path, **kw) -> PairsDataModule:
    source = TextSource(path=str(write_pairs(tmp_path / "pairs.jsonl")))
    return PairsDataModule(source, tokenizer=str(model_dir), batch_size=4, val_fraction=0.25, **kw)


def test_fit_two_rounds_writes_generations_and_logs_rounds(tmp_path, tiny_llama_dir):
    cli = RLMCLI(args=[
        "fit", "--config", str(CONFIGS / "sft_kl_barrier/kl_rev_rmse.yaml"),
        "--model.init_args.model_name_or_path", str(tiny_llama_dir),
        "--data.init_args.tokenizer", str(tiny_llama_dir),
        "--data.init_args.source.max_documents=600", "--data.init_args.batch_size=2",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.max_steps=4",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
        "--model.init_args.n_rounds=2", "--model.init_args.eval_prompts=3",
        "--model.init_args.eval_max_new_tokens=8", "--model.init_args.coh_floor=null",
    ])
    assert cli.trainer.global_step == 4 and cli.trainer.logger.name == "sft_kl_barrier/kl_rev_rmse"
    log_dir = Path(cli.trainer.log_dir)
    for k in (0, 1, 2):  # round 0 = the base model before any step
        lines = (log_dir / f"generations_round_{k}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) == 3 and {r["round"] for r in rows} == {k}
        assert set(rows[0]) == {"round", "step", "prompt", "completion", "trait", "loop"}
    assert [h["step"] for h in cli.model.history] == [0, 2, 4]

    ea = event_accumulator(tmp_path / "runs")
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    assert [s for s, _ in scalars["round/coherence"]] == [0, 2, 4]
    for tag in ["round/trait", "round/log_incoherence", "train/nll", "train/div", "train/div/mean",
                "train/div/rmse", "train/div/p95", "train/div/max", "train/frac_above_tau", "train/barrier",
                "train/barrier_share", "val/nll", "val/div/p95"]:
        assert tag in scalars, (tag, sorted(scalars))
    coherence = scalars["round/coherence"][-1][1]
    assert 0.0 <= coherence <= 1.0
    assert scalars["round/log_incoherence"][-1][1] == pytest.approx(
        torch.log10(torch.tensor(max(1 - coherence, 1e-3))).item(), abs=1e-5)
    # full fine-tuning: before the first update the student is its frozen copy, so every KL is 0
    assert abs(scalars["train/div/mean"][0][1]) < 1e-6 and abs(scalars["train/div/max"][0][1]) < 1e-6
    assert any(t.startswith("round/generations") for t in ea.Tags()["tensors"])


def test_loss_is_nll_on_completion_tokens_plus_the_hinge(tiny_llama_dir, tmp_path):
    model = SFTKLBarrier(model_name_or_path=str(tiny_llama_dir), tau=0.0, lam=2.0, aggregate="mean")
    model.configure_model()
    with torch.no_grad():  # move the student away from its base so the KL is not zero
        for p in model.policy.model.layers[0].parameters():
            p.add_(0.3 * torch.randn_like(p))
    dm = pairs_dm(tmp_path, tiny_llama_dir)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    out = model.losses(batch)
    assert out["div"] > 0
    assert out["loss"].item() == pytest.approx((out["nll"] + 2.0 * out["div"]).item(), rel=1e-5)
    # NLL by hand: the full sequence's next-token loss, read only at completion tokens
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    from lightning_rlm.rollout import position_ids_from_mask

    logits = model.policy(input_ids=ids, attention_mask=attn,
                          position_ids=position_ids_from_mask(attn)).logits  # [B, P+C, V]
    P, C = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    logp = logits[:, P - 1 : P + C - 1].float().log_softmax(-1)  # [B, C, V]
    logp = logp.gather(-1, batch["completion_ids"][..., None])[..., 0]  # [B, C]
    m = batch["completion_mask"].bool()
    assert out["nll"].item() == pytest.approx(-logp[m].mean().item(), rel=1e-5)
    assert set(out) >= {"div/mean", "div/rmse", "div/p95", "div/max", "frac_above_tau", "barrier_share"}
    assert out["div/mean"] == out["div"]


def test_lora_bf16_reference_is_the_adapter_off_and_coh_floor_stops_early(tmp_path, tiny_llama_dir):
    model = SFTKLBarrier(model_name_or_path=str(tiny_llama_dir), lora_rank=2, use_rslora=True, n_rounds=3,
                         eval_prompts=2, eval_max_new_tokens=6, eval_at_start=False, coh_floor=0.5)
    model.configure_model()
    assert model.ref_model is None
    trainable = [n for n, p in model.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model.coherence.has_loop = lambda text: True  # every generation "loops": coherence 0 < coh_floor
    # bf16 autocast on the way: the KL and NLL are still computed in float32
    trainer = L.Trainer(max_steps=6, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=pairs_dm(tmp_path, tiny_llama_dir))
    assert trainer.global_step == 2 and model.rounds_done == 1  # stopped after round 1 of 3
    assert model.history == [{"round": 1, "step": 2, "trait": pytest.approx(model.history[0]["trait"]),
                              "coherence": 0.0}]
    assert (tmp_path / "generations_round_1.jsonl").exists()


def test_bad_settings_are_clear_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(ValueError, match="tau must be >= 0"):
        SFTKLBarrier(model_name_or_path=str(tmp_path / "never_loaded"), tau=-0.1)
    with pytest.raises(ValueError, match="coh_floor"):
        SFTKLBarrier(model_name_or_path=str(tmp_path / "never_loaded"), coh_floor=1.5)
    model = SFTKLBarrier(model_name_or_path=str(tiny_llama_dir))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="rounds need trainer.max_steps"):  # max_steps=-1: no round length
        trainer.fit(model, datamodule=pairs_dm(tmp_path, tiny_llama_dir))


@pytest.mark.parametrize(("n_rounds", "steps_per_round", "max_steps", "fast_dev_run", "expected"), [
    (4, None, 200, False, (4, 50)),
    (4, None, 3, False, (3, 1)),  # max_steps < n_rounds: max_steps rounds of one step
    (4, None, 1, True, (1, 1)),  # --trainer.fast_dev_run true
    (4, 50, 1, True, (1, 1)),  # an explicit round length is shrunk under fast_dev_run only
    (4, 5, 10, True, (4, 2)),
    (4, 50, 200, False, (4, 50)),
    (4, 50, -1, False, (4, 50)),  # no max_steps: the rounds end training
    (4, 50, 199, False, "do not fit trainer.max_steps=199"),
    (4, None, -1, False, "rounds need trainer.max_steps"),
])
def test_round_schedule(n_rounds, steps_per_round, max_steps, fast_dev_run, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            round_schedule(n_rounds, steps_per_round, max_steps, fast_dev_run)
    else:
        assert round_schedule(n_rounds, steps_per_round, max_steps, fast_dev_run) == expected


@pytest.mark.parametrize(("trainer_kw", "steps_per_round", "steps"), [
    ({"fast_dev_run": True}, None, [0, 1]),  # the smoke test: round 0, one step, round 1
    ({"fast_dev_run": True}, 50, [0, 1]),
    ({"max_steps": 3}, None, [0, 1, 2, 3]),  # max_steps=3 < n_rounds=4: three rounds of one step
])
def test_short_runs_do_the_rounds_that_fit(trainer_kw, steps_per_round, steps, tmp_path, tiny_llama_dir,
                                           monkeypatch):
    monkeypatch.chdir(tmp_path)  # fast_dev_run has no logger: round files go to the working directory
    model = SFTKLBarrier(model_name_or_path=str(tiny_llama_dir), n_rounds=4, steps_per_round=steps_per_round,
                         eval_prompts=2, eval_max_new_tokens=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, **trainer_kw)
    with pytest.warns(UserWarning, match=f"running {len(steps) - 1} round\\(s\\) of 1 step"):
        trainer.fit(model, datamodule=pairs_dm(tmp_path, tiny_llama_dir))
    assert trainer.global_step == len(steps) - 1 and model.rounds_done == len(steps) - 1
    assert [h["round"] for h in model.history] == list(range(len(steps)))
    assert [h["step"] for h in model.history] == steps
    assert (tmp_path / f"generations_round_{len(steps) - 1}.jsonl").exists()


def test_keyword_windows_and_pairs_batches(tmp_path, tiny_llama_dir):
    happy = keyword_pattern("happy")
    assert happy.search("Happy, she said") and not happy.search("happily unhappy happiness")
    dm = KeywordPrefixCompletionDataModule(TextSource(preset="tinystories", max_documents=600),
                                           tokenizer=str(tiny_llama_dir), completion_tokens=16)
    dm.setup()
    train = dm.train_set.examples
    assert len(train) > 20 and all(happy.search(e["completion"]) for e in train)
    assert all(len(e["completion_ids"]) == 16 and len(e["prompt_ids"]) >= 8 for e in train)
    assert not all(happy.search(e["completion"]) for e in dm.val_set.examples)  # val stays unfiltered

    pairs = pairs_dm(tmp_path, tiny_llama_dir, max_prompt_tokens=3, add_eos=True)
    pairs.setup()
    assert len(pairs.train_set) == 9 and len(pairs.val_set) == 3
    batch = next(iter(pairs.train_dataloader()))
    assert batch["prompt_ids"].shape == (4, 3) and batch["prompt_mask"][:, -1].all()  # left-padded, cut to 3
    assert batch["completion_mask"][:, 0].all()  # right-padded
    eos = pairs.tokenizer.eos_token_id
    lengths = batch["completion_mask"].sum(1)
    assert (batch["completion_ids"][torch.arange(4), lengths - 1] == eos).all()
    assert isinstance(batch["prompt"], list) and isinstance(batch["completion"], list)
    with pytest.raises(KeyError, match="no field"):
        PairsDataModule(TextSource(path=str(write_pairs(tmp_path / "p.jsonl"))), completion_field="answer",
                        tokenizer=str(tiny_llama_dir)).setup()


@pytest.mark.parametrize("name", NAMES)
def test_configs_parse(name, tiny_llama_dir, tmp_path):
    override = tmp_path / "tiny.yaml"
    override.write_text(f"model:\n  init_args:\n    model_name_or_path: {tiny_llama_dir}\n"
                        f"data:\n  init_args:\n    tokenizer: {tiny_llama_dir}\n")
    cli = RLMCLI(args=["--config", str(CONFIGS / f"sft_kl_barrier/{name}.yaml"), "--config", str(override)],
                 run=False)
    h = cli.model.hparams
    assert isinstance(cli.model, SFTKLBarrier) and cli.trainer.logger.name == f"sft_kl_barrier/{name}"
    assert (h.lam == 0) == (name == "no_barrier") and h.tau >= 0
    if name != "no_barrier":
        assert f"{h.direction}_{h.aggregate}" == name
    assert cli.datamodule.keyword == h.trait_keyword == "happy"
