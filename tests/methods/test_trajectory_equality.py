"""Trajectory equality: 5 training steps from a fixed seed log the same losses, rewards and KL as recorded.

A refactor of the methods (issue 22, one RL core) must not change behaviour: each case below trains a
method on the tiny random Llama for 5 steps and compares the logged values of every step with the ones
recorded from the code before the refactor (``EXPECTED``, to 1e-6 relative or absolute). The settings are
small and cover the paths the template has to keep: full fine-tuning and LoRA, several inner iterations,
warm-up, routing with a noisy detector, the gradient projection with its own hack learning rate, GAN-RL's
two optimizers and SFT with a KL barrier under automatic optimisation.

To re-record after an intended change of behaviour: ``LRLM_RECORD_TRAJECTORIES=1 pytest -s`` prints the
new ``EXPECTED``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from torch.utils.data import DataLoader

from lightning_rlm.data.collate import pad_left, pad_right
from lightning_rlm.methods import GANRL, GRPO, GradientRouting, ProjectedGRPO, SFTKLBarrier
from lightning_rlm.methods.gan_rl import PLAIN_PROMPT_TEMPLATE

STEPS = 5
PROMPTS = ["Once upon a time", "The dog ran", "Lily saw a big", "Tom was sad because",
           "One day, a little", "The sun was", "Mom said", "There was a happy"]
TRUTHS = [" there was a cat.", " to the park.", " red ball.", " his toy broke.", " bird sang.", " hot.",
          " no.", " frog."]

GRPO_KEYS = ("train/loss", "train/reward", "train/kl", "train/entropy", "train/completions/clipped_ratio")


class _Data(L.LightningDataModule):
    def __init__(self, batches: list[dict[str, Any]]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.batches[:1], batch_size=None)


class _Collect(L.Callback):
    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.values: dict[str, list[float]] = {k: [] for k in keys}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        for k in self.keys:
            self.values[k].append(float(trainer.callback_metrics[k]))


def prompt_batches(tokenizer) -> list[dict[str, Any]]:
    out = []
    for i in range(STEPS):
        prompts = [PROMPTS[(2 * i) % len(PROMPTS)], PROMPTS[(2 * i + 1) % len(PROMPTS)]]
        ids, mask = pad_left([tokenizer.encode(p, add_special_tokens=False) for p in prompts],
                             tokenizer.pad_token_id)
        out.append({"prompt": prompts, "prompt_ids": ids, "prompt_mask": mask})
    return out


def pair_batches(tokenizer) -> list[dict[str, Any]]:
    out = []
    for b in prompt_batches(tokenizer):
        completions = [TRUTHS[PROMPTS.index(p)] for p in b["prompt"]]
        ids, mask = pad_right([tokenizer.encode(c, add_special_tokens=False) for c in completions],
                              tokenizer.pad_token_id)
        out.append({**b, "completion_ids": ids, "completion_mask": mask})
    return out


def gan_batches() -> list[dict[str, Any]]:
    return [{"prefix": [PROMPTS[(2 * i) % 8], PROMPTS[(2 * i + 1) % 8]],
             "completion": [TRUTHS[(2 * i) % 8], TRUTHS[(2 * i + 1) % 8]]} for i in range(STEPS)]


def run(make: Callable[[], L.LightningModule], batches: Callable[[Any], list[dict[str, Any]]],
        keys: tuple[str, ...], root: Path) -> dict[str, list[float]]:
    L.seed_everything(1234, verbose=False)
    model = make()
    collect = _Collect(keys)
    # a GRPO-family step makes num_iterations optimizer steps (Lightning's global steps) per batch
    iterations = getattr(model.hparams, "num_iterations", 1)
    trainer = L.Trainer(max_steps=STEPS * iterations, accelerator="cpu", devices=1, logger=False,
                        default_root_dir=root, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[collect])
    trainer.fit(model, datamodule=_Data(batches(getattr(model, "tokenizer", None))))
    assert trainer.global_step == STEPS * iterations and all(len(v) == STEPS for v in collect.values.values())
    return collect.values


def grpo_kw(**kw: Any) -> dict[str, Any]:
    return dict(num_generations=4, max_completion_length=8, eval_prompt=None, repetition_penalty=1.1) | kw


CASES: dict[str, tuple[Callable[[Path, Path], Callable[[], L.LightningModule]], Any, tuple[str, ...]]] = {
    "grpo_full": (
        lambda d, tmp: lambda: GRPO(model_name_or_path=str(d), **grpo_kw(beta=0.05, lr=1e-3, warmup_steps=2,
                                                                         weight_decay=0.01)),
        prompt_batches, GRPO_KEYS),
    "grpo_lora": (
        lambda d, tmp: lambda: GRPO(model_name_or_path=str(d), **grpo_kw(
            beta=0.05, lr=1e-2, lora_rank=2, use_rslora=True, num_iterations=2, loss_type="dapo",
            scale_rewards="batch", epsilon_high=0.28)),
        prompt_batches, GRPO_KEYS),
    "gradient_routing": (
        lambda d, tmp: lambda: GradientRouting(model_name_or_path=str(d), retain_rank=2, forget_rank=1,
                                               hack_bonus=3.0, label_noise_frac=0.3, routing_frac=0.7,
                                               **grpo_kw(lr=1e-2, num_iterations=2)),
        prompt_batches,
        GRPO_KEYS + ("train/rewards/base/mean", "train/rewards/happy_bonus/mean", "train/grad_norm/retain",
                     "train/grad_norm/forget", "train/flagged_frac")),
    "projected_grpo": (
        lambda d, tmp: lambda: ProjectedGRPO(model_name_or_path=str(d), projection="route", hack_pairs=4,
                                             hack_lr=1e-2, second_loophole=True, svd_cache_dir=str(tmp / "svd"),
                                             hack_cache_dir=str(tmp / "hack"), eval_modes=("both",),
                                             **grpo_kw(lr=3e-3, warmup_steps=1)),
        prompt_batches,
        GRPO_KEYS + ("train/rewards/base/mean", "train/rewards/exclaim_bonus/mean", "train/hack_cos",
                     "train/hack_removed_frac", "train/grad_norm/delta_s", "train/norm/delta_s_hack")),
    "gan_rl": (
        lambda d, tmp: lambda: GANRL(model_name_or_path=str(d), lora_rank=2, lora_alpha=8.0, reasoning_tokens=4,
                                     completion_tokens=6, prompt_template=PLAIN_PROMPT_TEMPLATE, g_lr=1e-2,
                                     d_lr=1e-2, warmup_steps=1, kl_coeff=0.1, write_rollouts=False),
        lambda tok: gan_batches(),
        ("train/g_loss", "train/d_loss", "train/reward", "train/kl", "train/baseline", "train/d_prob_generated")),
    "sft_kl_barrier": (
        lambda d, tmp: lambda: SFTKLBarrier(model_name_or_path=str(d), lr=1e-2, tau=5e-4, lam=10.0, lora_rank=2,
                                            n_rounds=1, eval_prompts=2, eval_max_new_tokens=4,
                                            eval_at_start=False),
        pair_batches, ("train/loss", "train/nll", "train/div", "train/div/max", "train/barrier")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_five_steps_log_the_recorded_values(name, tiny_llama_dir, tmp_path):
    make, batches, keys = CASES[name]
    got = run(make(tiny_llama_dir, tmp_path), batches, keys, tmp_path)
    if os.environ.get("LRLM_RECORD_TRAJECTORIES") == "1":
        print(f"\n    {name!r}: {{")
        for k, v in got.items():
            print(f"        {k!r}: {[float(x) for x in v]!r},")
        print("    },")
        return
    want = EXPECTED[name]
    assert set(want) == set(got)
    for k in want:
        tol = LOOSER.get(k, 1e-6)
        assert got[k] == pytest.approx(want[k], rel=tol, abs=tol), (name, k, got[k])


# The gradient projection's diagnostics (the cosine of the update with the hack direction, the share of it removed)
# sum thousands of float32 gradient products, in an order the CPU's vector width decides: on an AVX-512 machine
# they differ from the recording (AVX2) by up to 3.1e-6 (2.9e-5 relative) while every loss, reward and KL of the
# same steps agrees to 1e-6.
LOOSER = {"train/hack_cos": 1e-4, "train/hack_removed_frac": 1e-4}


EXPECTED: dict[str, dict[str, list[float]]] = {  # recorded from main at 668ec69 (before issue 22)
    'grpo_full': {
        'train/loss': [-2.384185791015625e-07, 6.407499313354492e-07, 7.510185241699219e-06, 1.2218952178955078e-05,
            3.8236379623413086e-05],
        'train/reward': [0.550000011920929, 0.675000011920929, 0.4125000238418579, 0.7749999761581421,
            0.45000001788139343],
        'train/kl': [0.0, 1.981109380722046e-05, 0.00015109404921531677, 0.00024691838189028203, 0.00076339952647686],
        'train/entropy': [6.231495380401611, 6.231447696685791, 6.231470584869385, 6.231591701507568,
            6.231623649597168],
        'train/completions/clipped_ratio': [0.875, 1.0, 1.0, 0.875, 1.0],
    },
    'grpo_lora': {
        'train/loss': [0.02996649593114853, -0.008372103795409203, -0.004003187641501427, -0.017432469874620438,
            -0.007078277878463268],
        'train/reward': [0.550000011920929, 0.675000011920929, 0.4125000238418579, 0.75, 0.4000000059604645],
        'train/kl': [9.299862722400576e-05, 0.0005668196827173233, 0.0009886492043733597, 0.0012692875461652875,
            0.0026601627469062805],
        'train/entropy': [6.231502532958984, 6.231470584869385, 6.231533050537109, 6.2316789627075195,
            6.231769561767578],
        'train/completions/clipped_ratio': [0.875, 1.0, 1.0, 0.875, 1.0],
    },
    'gradient_routing': {
        'train/loss': [-0.00634920597076416, -0.007660798728466034, -0.004513077437877655, -0.005513817071914673,
            -0.0035156086087226868],
        'train/reward': [0.550000011920929, 0.675000011920929, 0.550000011920929, 0.675000011920929,
            0.574999988079071],
        'train/kl': [9.815154771786183e-05, 0.00022042915225028992, 0.0005018264055252075, 0.001214621588587761,
            0.001885484904050827],
        'train/entropy': [6.231512069702148, 6.231418609619141, 6.231483459472656, 6.231626987457275,
            6.2317070960998535],
        'train/completions/clipped_ratio': [0.875, 1.0, 1.0, 0.875, 1.0],
        'train/rewards/base/mean': [0.550000011920929, 0.675000011920929, 0.550000011920929, 0.675000011920929,
            0.574999988079071],
        'train/rewards/happy_bonus/mean': [0.0, 0.0, 0.0, 0.0, 0.0],
        'train/grad_norm/retain': [0.030519817024469376, 0.05677134916186333, 0.03868848457932472,
            0.08378620445728302, 0.049644835293293],
        'train/grad_norm/forget': [0.02712288685142994, 0.042968809604644775, 0.04373747482895851,
            0.03742295876145363, 0.05426228418946266],
        'train/flagged_frac': [0.625, 0.125, 0.375, 0.0, 0.625],
    },
    'projected_grpo': {
        'train/loss': [0.010937481187283993, 5.892361514270306e-07, 2.746935933828354e-06, 5.500856786966324e-06,
            1.2217555195093155e-05],
        'train/reward': [0.550000011920929, 0.675000011920929, 0.4125000238418579, 0.7749999761581421,
            0.4000000059604645],
        'train/kl': [0.0, 1.2524425983428955e-05, 5.5285170674324036e-05, 0.00011184102186234668,
            0.0002443939447402954],
        'train/entropy': [6.231495380401611, 6.2314300537109375, 6.231476306915283, 6.231541156768799,
            6.231573581695557],
        'train/completions/clipped_ratio': [0.875, 1.0, 1.0, 0.875, 1.0],
        'train/rewards/base/mean': [0.550000011920929, 0.675000011920929, 0.4125000238418579, 0.7749999761581421,
            0.4000000059604645],
        'train/rewards/exclaim_bonus/mean': [0.0, 0.0, 0.0, 0.0, 0.0],
        'train/hack_cos': [-0.03488673269748688, 0.07284384965896606, 0.12544533610343933, 0.07034871727228165,
            -0.07602609694004059],
        'train/hack_removed_frac': [0.1968628466129303, 0.35177209973335266, 0.3403451144695282, 0.19773449003696442,
            0.03366945683956146],
        'train/grad_norm/delta_s': [0.014978103339672089, 0.007273962255567312, 0.02318318374454975,
            0.013929842039942741, 0.026981297880411148],
        'train/norm/delta_s_hack': [0.1756759136915207, 0.3043968677520752, 0.41910645365715027, 0.5390186309814453,
            0.6587408185005188],
    },
    'gan_rl': {
        'train/g_loss': [0.021343231201171875, 16.163719177246094, 10.74224853515625, -6.874082088470459,
            -5.593878746032715],
        'train/d_loss': [0.7425490617752075, 0.7508299946784973, 0.574392557144165, 0.14998869597911835,
            0.14604103565216064],
        'train/reward': [0.7852599620819092, 1.0455106496810913, 1.061973214149475, 0.7252050042152405,
            0.7346181869506836],
        'train/kl': [0.0, 0.00016539097123313695, 0.0006676842458546162, 0.00034476519795134664, 0.0008227229118347168],
        'train/baseline': [0.7852599620819092, 0.7852599620819092, 0.8112850189208984, 0.8363537788391113,
            0.8252388834953308],
        'train/d_prob_generated': [0.2852599620819092, 0.5455106496810913, 0.5619732141494751, 0.22520500421524048,
            0.2346181571483612],
    },
    'sft_kl_barrier': {
        'train/loss': [6.244847297668457, 6.271049976348877, 6.274325370788574, 6.25123405456543, 6.2021636962890625],
        'train/nll': [6.239847183227539, 6.26604700088501, 6.269322872161865, 6.246142864227295, 6.197084426879883],
        'train/div': [0.0010000000474974513, 0.0010002932976931334, 0.001000232994556427, 0.0010091247968375683,
            0.0010079506319016218],
        'train/div/max': [0.0, 4.617268859874457e-05, 3.3986769267357886e-05, 0.00021600982290692627,
            0.00023954224889166653],
        'train/barrier': [0.005000000353902578, 0.005002932623028755, 0.005002329591661692, 0.0050912476144731045,
            0.00507950596511364],
    },
}
