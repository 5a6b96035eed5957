"""TensorBoard's HParams tab of a run: the whole resolved config with the run's final metrics, no stray
hp_metric, and the metric curves untouched."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_rlm.cli import RLMCLI, flat_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_flat_config():
    assert flat_config({"model": {"init_args": {"lr": 1e-4, "rewards": [1, 2], "x": None}}, "seed": 3}) == {
        "model.init_args.lr": 1e-4, "model.init_args.rewards": "[1, 2]", "model.init_args.x": "None", "seed": 3}


def test_hparams_tab_holds_the_config_and_final_metrics(tmp_path, tiny_llama_dir):
    cli = RLMCLI(args=["fit", "--config", str(CONFIGS / "grpo/sentence_length_10_smooth.yaml"),
                       "--model.init_args.model_name_or_path", str(tiny_llama_dir), "--data.init_args.tokenizer",
                       str(tiny_llama_dir), "--trainer.logger.init_args.save_dir", str(tmp_path),
                       "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
                       "--trainer.log_every_n_steps=1", "--model.init_args.num_generations=2",
                       "--model.init_args.max_completion_length=6", "--model.init_args.eval_samples=2",
                       "--trainer.enable_progress_bar=false"])
    ea = EventAccumulator(cli.trainer.log_dir)
    ea.Reload()
    scalars = ea.Tags()["scalars"]
    assert "hp_metric" not in scalars
    final = cli.trainer.callback_metrics["train/reward"].item()
    assert [e.value for e in ea.Scalars("hparams/train/reward")] == [final]
    assert len(ea.Scalars("train/reward")) == 2  # the curve itself gets no extra point
    assert len(list(Path(cli.trainer.log_dir).glob("events.out.tfevents*"))) == 1  # written while the logger is open
    keys: set[str] = set()
    for path in Path(cli.trainer.log_dir).glob("events.out.tfevents*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    keys |= set(data.session_start_info.hparams)
    for key in ("model.init_args.lr", "model.init_args.num_generations", "data.init_args.batch_size",
                "data.class_path", "trainer.max_steps", "seed_everything"):
        assert key in keys, (key, sorted(keys)[:20])
