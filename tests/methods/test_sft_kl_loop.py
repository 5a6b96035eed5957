"""The self-feeding KL-barrier loop on a tiny random Llama: round r trains on round r − 1's kept generations,
the random control keeps as many, the persona trait, coh_floor, the pool across a checkpoint, tau calibration."""

import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_rlm.cli import RLMCLI
from lightning_rlm.data import TextSource
from lightning_rlm.data.pairs import PairsDataModule
from lightning_rlm.data.rounds import select_pool
from lightning_rlm.losses.kl import aggregate_kl, suggest_tau
from lightning_rlm.methods import SFTKLBarrier
from lightning_rlm.methods.sft_kl_barrier import LOGGED_AGGREGATES

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LOOP_CONFIGS = sorted((CONFIGS / "sft_kl_barrier").glob("loop_*.yaml"))
PERSONAS = {"trait": "persona", "persona_positive": "You are a cheerful storyteller who loves happy endings.",
            "persona_negative": "You are a gloomy storyteller who loves sad endings."}


def pairs_dm(tmp_path: Path, model_dir: Path, n: int = 12, batch_size: int = 4) -> PairsDataModule:
    rows = [{"prompt": f"Tom had {i} red balls.", "completion": " He was happy and played all day."}
            for i in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return PairsDataModule(TextSource(path=str(path)), tokenizer=str(model_dir), batch_size=batch_size,
                           val_fraction=0.25)


def loop_model(model_dir: Path, **kw) -> SFTKLBarrier:
    args = {"model_name_or_path": str(model_dir), "data_source": "self_feeding", "lr": 1e-2, "tau": 0.0,
            "eval_prompts": 2, "eval_max_new_tokens": 6, "pool_prompts": 4, "pool_num_generations": 2, **kw}
    return SFTKLBarrier(**args)


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                        "default_root_dir": tmp_path, **kw})


def record(model: SFTKLBarrier) -> tuple[dict[int, list[dict]], list[tuple[int, int, dict]]]:
    """Spy on a model: the pool after each round, and every training example with (step, rounds done)."""
    pools: dict[int, list[dict]] = {}
    trained: list[tuple[int, int, dict]] = []
    run_round, losses = model.run_round, model.losses

    def spy_round(k):
        out = run_round(k)
        pools[k] = [dict(r) for r in model.pool]
        return out

    def spy_losses(batch):
        for i in range(len(batch["completion"])):
            trained.append((model.global_step, model.rounds_done, {
                "prompt_ids": batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist(),
                "completion_ids": batch["completion_ids"][i][batch["completion_mask"][i].bool()].tolist(),
                "completion": batch["completion"][i]}))
        return losses(batch)

    model.run_round, model.losses = spy_round, spy_losses
    return pools, trained


def key(example: dict) -> tuple:
    return tuple(example["prompt_ids"]), tuple(example["completion_ids"]), example["completion"]


def test_round_r_trains_on_exactly_round_r_minus_1s_kept_generations(tmp_path, tiny_llama_dir):
    # the persona trait (continuous scores) keeps the 3 best of 8 generations; 2 steps of 4 cover the pool
    model = loop_model(tiny_llama_dir, n_rounds=3, steps_per_round=2, keep_top=3, keep_min_score=None,
                       **PERSONAS)
    pools, trained = record(model)
    trainer(tmp_path, max_steps=6).fit(model, datamodule=pairs_dm(tmp_path, tiny_llama_dir))
    assert model.rounds_done == 3 and sorted(pools) == [0, 1, 2, 3]
    for k, pool in pools.items():
        rows = [json.loads(line) for line in (tmp_path / f"pool_round_{k}.jsonl").read_text().splitlines()]
        assert len(rows) == 8 and len(pool) == 3  # 4 train prompts x 2 samples, the 3 best kept
        scores = [r["score"] for r in rows]
        best = sorted(range(8), key=lambda i: -scores[i])[:3]
        assert [r["completion"] for r in rows if r["kept"]] == [rows[i]["completion"] for i in sorted(best)]
        assert [r["completion"] for r in pool] == [r["completion"] for r in rows if r["kept"]]
        assert all(r["prompt"].startswith("Tom had") for r in rows)  # the DataModule's train prompts
    assert len(trained) == 6 * 4
    for r in (1, 2, 3):  # the steps of round r (after round r - 1 ended): round r - 1's kept generations only
        used = [ex for step, done, ex in trained if done == r - 1]
        assert len(used) == 2 * 4
        assert {key(ex) for ex in used} == {key(ex) for ex in pools[r - 1]}
    # the model trains on its own ids: a completion is its sampled ids (EOS included when one came)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert all(ex["completion"] == tok.decode(ex["completion_ids"], skip_special_tokens=True)
               for ex in pools[0])
    assert [h["pool_kept"] for h in model.history] == [3, 3, 3, 3]


def test_select_pool_and_the_random_control_keeps_as_many():
    scores = [0.5, -1.0, 2.0, 0.5, 0.0, 3.0]
    rng = random.Random(0)
    assert select_pool(scores, None, 0.0, "trait", rng) == [0, 2, 3, 5]  # above the threshold
    assert select_pool(scores, 2, 0.0, "trait", rng) == [2, 5]  # the 2 best of those
    assert select_pool(scores, 3, None, "trait", rng) == [0, 2, 5]  # ties: the earlier first
    assert select_pool(scores, 0.5, None, "trait", rng) == [0, 2, 5]  # half of all 6
    assert select_pool(scores, None, None, "trait", rng) == list(range(6))
    assert select_pool(scores, None, 10.0, "trait", rng) == []
    for keep_top, keep_min in [(None, 0.0), (2, 0.0), (0.5, None), (None, 10.0), (1, -5.0)]:
        trait = select_pool(scores, keep_top, keep_min, "trait", random.Random(1))
        control = select_pool(scores, keep_top, keep_min, "random", random.Random(1))
        assert len(control) == len(trait) and control == sorted(set(control)) and set(control) <= set(range(6))
    draws = {tuple(select_pool(scores, None, 0.0, "random", random.Random(s))) for s in range(20)}
    assert len(draws) > 1  # drawn at random, not the trait's choice


def test_random_control_keeps_the_count_the_trait_would_in_the_loop(tmp_path, tiny_llama_dir):
    # persona scores above 0: the count the trait keeps changes from round to round; the control matches it
    model = loop_model(tiny_llama_dir, n_rounds=2, steps_per_round=1, selection="random", keep_min_score=0.0,
                       pool_prompts=6, **PERSONAS)
    pools, trained = record(model)
    trainer(tmp_path, max_steps=2).fit(model, datamodule=pairs_dm(tmp_path, tiny_llama_dir))
    differs = False
    for k in range(model.rounds_done + 1):
        rows = [json.loads(line) for line in (tmp_path / f"pool_round_{k}.jsonl").read_text().splitlines()]
        by_trait = select_pool([r["score"] for r in rows], None, 0.0, "trait", random.Random(0))
        kept = [i for i, r in enumerate(rows) if r["kept"]]
        assert len(kept) == len(by_trait) == len(pools[k]) and 0 < len(kept) < len(rows)
        differs |= kept != by_trait
    assert differs
    assert {key(ex) for step, done, ex in trained if done == 0} <= {key(ex) for ex in pools[0]}


def test_persona_score_is_the_difference_of_two_hand_computed_log_likelihoods(tiny_chat_llama_dir):
    template = "<|im_start|>system\n{persona}<|im_end|>\n{prompt}"
    model = SFTKLBarrier(model_name_or_path=str(tiny_chat_llama_dir), lora_rank=2, persona_template=template,
                         **PERSONAS)
    model.configure_model()
    with torch.no_grad():  # move the adapter: the score must come from the base, not the student
        for name, p in model.policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn_like(p))
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    prompt = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
    records = [{"prompt": prompt, "completion_ids": tok.encode(" Lily was happy.", add_special_tokens=False)},
               {"prompt": "Once", "completion_ids": tok.encode(" upon a time", add_special_tokens=False)
                + [tok.eos_token_id]}]
    for r in records:
        r["completion"] = tok.decode(r["completion_ids"], skip_special_tokens=True)
    model.add_scores(records)

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir).eval()

    def loglik(persona: str, r: dict) -> float:
        context = tok.encode(template.format(persona=persona, prompt=r["prompt"]), add_special_tokens=False)
        ids = torch.tensor([context + r["completion_ids"]])
        with torch.no_grad():
            logp = base(input_ids=ids).logits[0].float().log_softmax(-1)  # [L, V]
        return sum(logp[len(context) - 1 + t, tok_id].item() for t, tok_id in enumerate(r["completion_ids"]))

    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.encode(template.format(persona="x", prompt=prompt), add_special_tokens=False).count(im_start) == 3
    for r in records:
        expected = loglik(PERSONAS["persona_positive"], r) - loglik(PERSONAS["persona_negative"], r)
        assert r["score"] == pytest.approx(expected, abs=1e-4) and r["score"] != 0
    assert [r["loop"] for r in records] == [False, False]


@pytest.mark.parametrize("case", ["coh_floor", "empty_pool"])
def test_the_loop_stops_on_coh_floor_and_on_an_empty_pool(case, tmp_path, tiny_llama_dir):
    if case == "coh_floor":  # every generation "loops": held-out coherence 0 < coh_floor after round 1
        model = loop_model(tiny_llama_dir, n_rounds=3, steps_per_round=2, keep_min_score=None, coh_floor=0.5)
        model.coherence.has_loop = lambda text: True
    else:  # a keyword no generation contains: round 0 keeps nothing, so no step can run
        model = loop_model(tiny_llama_dir, n_rounds=3, steps_per_round=2, trait_keyword="zzzqqq")
    trainer(tmp_path, max_steps=6).fit(model, datamodule=pairs_dm(tmp_path, tiny_llama_dir))
    if case == "coh_floor":
        assert model.global_step == 2 and model.rounds_done == 1 and len(model.pool) == 8
        assert [h["coherence"] for h in model.history] == [0.0, 0.0]
    else:
        assert model.global_step == 0 and model.rounds_done == 0 and model.pool == []
        assert model.history[0]["pool_kept"] == 0


def test_the_pool_survives_a_checkpoint_and_a_resumed_loop_is_exact(tmp_path, tiny_llama_dir):
    kw = {"n_rounds": 2, "steps_per_round": 2, "keep_top": 5, "keep_min_score": None, "pool_prompts": 6}
    straight = loop_model(tiny_llama_dir, **kw)
    pools, trained = record(straight)
    trainer(tmp_path / "a", max_steps=4).fit(straight, datamodule=pairs_dm(tmp_path, tiny_llama_dir, batch_size=2))

    class StopAt2(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 2

    first = loop_model(tiny_llama_dir, **kw)
    t = trainer(tmp_path / "b", max_steps=4, callbacks=[StopAt2()])
    t.fit(first, datamodule=pairs_dm(tmp_path, tiny_llama_dir, batch_size=2))
    assert first.global_step == 2 and first.rounds_done == 1 and first.pool_draws == 0
    first.pool_batch({"completion_ids": [0, 0]})  # draw one batch, so the checkpoint holds a position mid-pool
    ckpt = tmp_path / "round1.ckpt"
    t.save_checkpoint(ckpt)

    # the state round trip: pool, its round, the batches drawn, earlier rounds' texts
    checkpoint = torch.load(ckpt, weights_only=True)
    fresh = loop_model(tiny_llama_dir, **kw)
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.pool == first.pool and len(fresh.pool) == 5 and fresh.pool_round == 1
    assert fresh.pool_draws == 1 and fresh.pool_seen == first.pool_seen and len(fresh.pool_seen) >= 5
    assert fresh.history == first.history

    # resuming trains on the same pool batches and samples the same next pool as the uninterrupted run
    first.pool_draws = 0
    t.save_checkpoint(ckpt)
    resumed = loop_model(tiny_llama_dir, **kw)
    resumed_pools, resumed_trained = record(resumed)
    trainer(tmp_path / "b", max_steps=4).fit(resumed, datamodule=pairs_dm(tmp_path, tiny_llama_dir, batch_size=2),
                                            ckpt_path=str(ckpt))
    assert resumed.global_step == 4 and sorted(resumed_pools) == [2]
    assert [key(ex) for _, _, ex in resumed_trained] == [key(ex) for step, _, ex in trained if step >= 2]
    assert [key(ex) for ex in resumed_pools[2]] == [key(ex) for ex in pools[2]]
    assert resumed.history == straight.history


def test_sequence_divergences_and_suggest_tau(tmp_path, tiny_llama_dir):
    model = SFTKLBarrier(model_name_or_path=str(tiny_llama_dir), direction="kl_rev")
    model.configure_model()
    with torch.no_grad():
        for p in model.policy.model.layers[0].parameters():
            p.add_(0.3 * torch.randn_like(p))
    dm = pairs_dm(tmp_path, tiny_llama_dir)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    per_seq = model.sequence_divergences(batch)
    assert set(per_seq) == set(LOGGED_AGGREGATES) and all(v.shape == (4,) for v in per_seq.values())
    assert (per_seq["mean"] <= per_seq["rmse"] + 1e-6).all() and (per_seq["rmse"] <= per_seq["max"] + 1e-6).all()
    one = {k: v[:1] for k, v in batch.items() if torch.is_tensor(v)}
    assert per_seq["p95"][0].item() == pytest.approx(model.sequence_divergences(one)["p95"][0].item(), rel=1e-5)
    from lightning_rlm.losses.kl import per_position_kl

    kl = per_position_kl(model.completion_logits(model.policy, one), model.base_logits(one), "kl_rev")
    assert per_seq["mean"][0].item() == pytest.approx(aggregate_kl(kl, one["completion_mask"], "mean").item(),
                                                      rel=1e-5)

    s = suggest_tau([0.01, 0.02, 0.03, 0.02], [0.5, 0.8, 1.0])
    assert s["separable"] and s["auc"] == 1.0 and s["coherent_p90"] < s["tau"] < s["looping_p10"]
    s = suggest_tau([0.1, 0.5, 0.9], [0.2, 0.6, 1.0])
    assert not s["separable"] and 0.5 < s["auc"] < 1 and s["tau"] == pytest.approx((0.5 * 0.6) ** 0.5)


def test_bad_loop_settings_are_clear_errors(tmp_path):
    never = str(tmp_path / "never_loaded")
    for kw, match in [({"trait": "persona"}, "persona_positive and persona_negative"),
                      ({**PERSONAS, "persona_template": "{persona}"}, "must contain"),
                      ({**PERSONAS, "persona_template": "{persona} {prompt} {x}"}, "only"),
                      ({"keep_top": 0}, "keep_top"), ({"keep_top": 1.5}, "keep_top"),
                      ({"keep_top": True}, "keep_top"), ({"selection": "best"}, "selection"),
                      ({"data_source": "mixed"}, "data_source"), ({"pool_prompts": 0}, "pool_prompts"),
                      ({"keep_min_score": float("nan")}, "keep_min_score")]:
        with pytest.raises(ValueError, match=match):
            SFTKLBarrier(model_name_or_path=never, **kw)


@pytest.mark.parametrize("config", LOOP_CONFIGS, ids=lambda p: p.stem)
def test_loop_configs_parse(config, tiny_llama_dir, tmp_path):
    override = tmp_path / "tiny.yaml"
    override.write_text(f"model:\n  init_args:\n    model_name_or_path: {tiny_llama_dir}\n"
                        f"data:\n  init_args:\n    tokenizer: {tiny_llama_dir}\n")
    cli = RLMCLI(args=["--config", str(config), "--config", str(override)], run=False)
    h = cli.model.hparams
    assert h.data_source == "self_feeding" and h.n_rounds == 8 and h.coh_floor is not None
    assert h.selection == ("random" if "control" in config.stem else "trait")
    assert h.aggregate == ("mean" if config.stem.endswith("mean") else "rmse")
    assert cli.datamodule.keyword == h.trait_keyword
