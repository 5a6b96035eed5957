"""LanguageModel: fast_dev_run of each LM config, a learning test on real Shakespeare, exact resume."""

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_rlm.cli import RLMCLI
from lightning_rlm.data import LMWindowDataModule, TextSource
from lightning_rlm.methods import LanguageModel
from lightning_rlm.models import GRULanguageModel

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def run_cli(*args: str):
    return RLMCLI(args=list(args))


@pytest.mark.parametrize("config", ["lm/gru_shakespeare.yaml", "lm/llama_tinystories.yaml"])
def test_fast_dev_run(config, tmp_path, shared_data):
    export = tmp_path / "hf"
    cli = run_cli("fit", "--config", str(CONFIGS / config), "--trainer.fast_dev_run=2",
                  "--trainer.default_root_dir", str(tmp_path), "--model.init_args.export_dir", str(export),
                  "--trainer.logger.init_args.save_dir", str(tmp_path))
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    if "llama" in config:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(export)
        tok = AutoTokenizer.from_pretrained(export)
        ids = tok("Once upon a time", return_tensors="pt").input_ids
        assert model(ids).logits.shape[-1] == len(tok) == 2048


def test_gru_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    lm = LanguageModel(network=lambda v: GRULanguageModel(v, embed_dim=8, hidden_size=16, num_layers=1),
                       vocab_size=11)
    x = torch.randint(0, 11, (2, 7))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    logits = lm.net(batch["input_ids"])
    by_hand = -torch.log_softmax(logits, -1).gather(-1, batch["labels"][..., None]).mean()
    assert torch.allclose(lm.nll(batch), by_hand, atol=1e-6)
    assert torch.allclose(lm.nll(batch), F.cross_entropy(logits.reshape(-1, 11), batch["labels"].reshape(-1)))


def _small_gru_run(tmp_path, max_steps, ckpt_path=None, **trainer_kwargs):
    L.seed_everything(0)
    dm = LMWindowDataModule(TextSource(preset="shakespeare"), block_size=64, batch_size=32)
    lm = LanguageModel(network=lambda v: GRULanguageModel(v, embed_dim=64, hidden_size=128, num_layers=1),
                       lr=3e-3, sample_every_n_steps=0)
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer_kwargs.setdefault("limit_val_batches", 4)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)],
                        **trainer_kwargs)
    return dm, lm, trainer


def test_val_loss_falls_on_real_shakespeare(tmp_path, shared_data):
    dm, lm, trainer = _small_gru_run(tmp_path, max_steps=80, val_check_interval=80, num_sanity_val_steps=0)
    before = trainer.validate(lm, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(lm, datamodule=dm)
    after = trainer.callback_metrics["val/loss"].item()
    assert before > 4.0  # ~ln(65) at init
    assert after < before - 1.2, (before, after)


def test_resume_from_last_ckpt_continues_steps_and_optimizer(tmp_path, shared_data):
    dm, lm, trainer = _small_gru_run(tmp_path, max_steps=6, limit_val_batches=0)
    trainer.fit(lm, datamodule=dm)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 6
    saved_state = saved["optimizer_states"][0]["state"]

    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["start_step"] = trainer.global_step
            opt_state = trainer.optimizers[0].state_dict()["state"]
            seen["exp_avg_equal"] = all(
                torch.equal(opt_state[k]["exp_avg"], saved_state[k]["exp_avg"]) for k in saved_state
            )

    dm2, lm2, trainer2 = _small_gru_run(tmp_path, max_steps=10, limit_val_batches=0)
    trainer2.callbacks.append(Probe())
    trainer2.fit(lm2, datamodule=dm2, ckpt_path=str(last))
    assert seen == {"start_step": 6, "exp_avg_equal": True}
    assert trainer2.global_step == 10
    step_count = next(iter(trainer2.optimizers[0].state_dict()["state"].values()))["step"]
    assert int(step_count) == 10


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_other_subcommands(subcommand, tmp_path, shared_data):
    limit = {"validate": "limit_val_batches", "test": "limit_test_batches", "predict": "limit_predict_batches"}
    cli = run_cli(subcommand, "--config", str(CONFIGS / "lm/gru_shakespeare.yaml"),
                  f"--trainer.{limit[subcommand]}=1", "--data.init_args.batch_size=2",
                  "--model.init_args.sample_tokens=5", "--trainer.logger.init_args.save_dir", str(tmp_path))
    if subcommand == "predict":
        preds = cli.trainer.predict_loop.predictions
        assert len(preds) == 1 and len(preds[0]) == 2 and all(isinstance(p, str) for p in preds[0])
    else:
        assert f"{'val' if subcommand == 'validate' else 'test'}/loss" in cli.trainer.callback_metrics


def test_each_sample_is_logged_once(tmp_path):
    """A sample every 2 steps over 4 steps: steps 2 and 4, and none again at the end of fit (step 4)."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    dm = LMWindowDataModule(TextSource(preset="shakespeare"), block_size=32, batch_size=4)
    lm = LanguageModel(network=lambda v: GRULanguageModel(v, embed_dim=8, hidden_size=16, num_layers=1),
                       sample_every_n_steps=2, sample_tokens=8)
    trainer = L.Trainer(max_steps=4, limit_val_batches=0, accelerator="cpu", logger=TensorBoardLogger(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(lm, dm)
    steps = [event.step for path in Path(trainer.log_dir).glob("events.out.tfevents*")
             for event in EventFileLoader(str(path)).Load()
             for value in event.summary.value if value.tag.startswith("samples")]
    assert sorted(steps) == [2, 4]
