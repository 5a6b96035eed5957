"""Every shipped YAML parses (run=False): method configs alone, presets on top of a method config."""

import re
from pathlib import Path

import pytest

from lightning_rlm.cli import RLMCLI
from lightning_rlm.data.catalog import dataset_of_file
from lightning_rlm.data.sources import PRESETS as PRESET_FILES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHOD_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "presets")
PRESETS = sorted((CONFIGS / "presets").glob("*.yaml"))


def parse(*configs: Path):
    args = []
    for c in configs:
        args += ["--config", str(c)]
    return RLMCLI(args=args, run=False)


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_method_config_parses(config, shared_data, tmp_path, need_data, tiny_model_config):
    text = config.read_text()
    for dataset in ("pile", "fineweb"):  # samples that do not travel with the package
        if f"preset: {dataset}" in text:
            need_data(PRESET_FILES[dataset]["path"])
    for rel in re.findall(r"path:\s*([\w./-]+)", text):  # catalog files named by path (e.g. gsm8k/train.jsonl)
        if dataset_of_file(rel):
            need_data(rel)
    # configs on the pretrained base model or SmolLM2 are instantiated on a tiny random one (no minutes-long
    # build); the SmolLM2 ones on a tiny model with ChatML's tokens and template
    extra = [tiny] if (tiny := tiny_model_config(config)) else []
    cli = parse(config, *extra)
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_composes(preset, shared_data, tmp_path):
    # GPU presets are parsed for real, then pointed at the CPU so the Trainer can be built here
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text("trainer:\n  accelerator: cpu\n  devices: 1\n  strategy: auto\n")
    extra = [cpu] if "gpu" in preset.name else []
    cli = parse(CONFIGS / "lm" / "gru_shakespeare.yaml", preset, *extra)
    assert cli.trainer is not None


def test_run_name_follows_the_config_path(shared_data):
    cli = parse(CONFIGS / "lm" / "gru_shakespeare.yaml")
    assert cli.trainer.logger.name == "lm/gru_shakespeare"
