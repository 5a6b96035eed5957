"""`lightning-rlm rationalize` -> SFT on the rationales -> GAN-RL from the SFT'd adapter (docs/rationalize.md).

The choice of trace on hand-built scores; the scorer against a plain HF forward; the command end to end on the
tiny random Llama (rows, hint, the run's config.yaml, refusals); the SFT examples' loss mask (reasoning and
completion, never the prompt or think_close) down to SFTKLBarrier's NLL; GAN-RL starting from the SFT run's
adapter (checkpoint and exported PEFT folder) with its weights equal at step 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_rlm.main import main
from lightning_rlm.rollout.rationalize import (
    ROW_FIELDS,
    ground_truth_logprobs,
    ngram_overlap,
    pick_best,
    rationale_row,
    summarize,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PLAIN = "<prefix>\n{text}\n</prefix>\n<think>\n"
CLOSE = "\n</think>\n"
PAIRS = [("Once upon a time, there was a little dog named Max.", " Max liked to run in the park."),
         ("Lily had a red ball. She threw it", " very high and laughed."),
         ("The sun was hot. Tom wanted", " to swim in the lake with his mom.")]


# ----- pure logic --------------------------------------------------------------------------------------------
def test_the_trace_with_the_highest_ground_truth_likelihood_is_kept():
    assert pick_best([-3.0, -1.5, -2.0]) == 1
    assert pick_best([-1.0, -1.0, -2.0]) == 0  # ties: the first
    assert pick_best([float("nan"), -4.0]) == 1  # a NaN score never wins
    row = rationale_row(prefix="p", ground_truth=" the end.", prompt="P(p)", think_close=CLOSE,
                        traces=["a", "b", "c"], scores=[-3.0, -1.5, -2.0], baseline_score=-2.5, ground_truth_tokens=4)
    assert set(row) == set(ROW_FIELDS)
    assert row["reasoning"] == "b" and row["best"] == 1 and row["score"] == -1.5
    assert row["baseline_score"] == -2.5 and row["gain"] == pytest.approx(1.0)
    assert row["all_scores"] == [-3.0, -1.5, -2.0] and row["traces"] == ["a", "b", "c"]
    assert row["completion"] == row["ground_truth"] == " the end." and row["think_close"] == CLOSE
    worse = rationale_row(prefix="q", ground_truth="x", prompt="P(q)", think_close=CLOSE, traces=["d", "e"],
                          scores=[-9.0, -7.0], baseline_score=-6.5, ground_truth_tokens=1)
    assert worse["reasoning"] == "e" and worse["gain"] == pytest.approx(-0.5)
    stats = summarize([row, worse])
    assert stats["mean_gain"] == pytest.approx(0.25) and stats["share_better"] == 0.5
    assert stats["mean_gain_per_token"] == pytest.approx(0.5 / 5) and stats["rows"] == 2
    with pytest.raises(ValueError, match="3 traces but 2 scores"):
        rationale_row(prefix="p", ground_truth="g", prompt="P", think_close=CLOSE, traces=["a", "b", "c"],
                      scores=[0.0, 1.0], baseline_score=0.0, ground_truth_tokens=1)


def test_ngram_overlap_measures_copying_of_the_ground_truth():
    truth = "Max liked to run in the park"
    assert ngram_overlap("I think Max liked to run in the park.", truth) == 1.0
    assert ngram_overlap("a dog story about a park", truth) == 0.0
    assert ngram_overlap("anything", "too short") == 0.0


# ----- the scorer ----------------------------------------------------------------------------------------------
def plain_logprob(model, context: list[int], target: list[int]) -> float:
    """Σ log p(target | context) from one unpadded HF forward, computed independently of the scorer."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + target])).logits[0].double()  # [T, V]
    logp = logits.log_softmax(-1)
    return sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(target))


def test_scorer_equals_a_plain_forward(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    contexts = [enc(PLAIN.replace("{text}", p)) + enc(r) + enc(CLOSE)
                for (p, _), r in zip(PAIRS, ["he thinks", "", "a long trace about the lake and the sun"])]
    targets = [enc(t) for _, t in PAIRS]
    got = ground_truth_logprobs(model, contexts, targets, tok.eos_token_id)  # one padded batch
    assert ground_truth_logprobs(model, contexts, targets, tok.eos_token_id, batch_size=1) == pytest.approx(got,
                                                                                                           abs=1e-5)
    for g, c, t in zip(got, contexts, targets):
        assert abs(g - plain_logprob(model, c, t)) <= 1e-5


# ----- the command --------------------------------------------------------------------------------------------
def write_rollouts(path: Path) -> Path:
    rows = [{"step": i, "rank": 0, "prefix": p, "reasoning": "r", "completion": "c", "ground_truth": t,
             "reward": 0.5} for i, (p, t) in enumerate(PAIRS + PAIRS[:1])]  # the first pair twice
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(*args: str) -> None:
    assert main(["rationalize", *args]) is None


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rationalize_writes_the_documented_rows(tmp_path, tiny_llama_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rollouts = write_rollouts(tmp_path / "rollouts.jsonl")
    out = tmp_path / "rationales.jsonl"
    run("--from-rollouts", str(rollouts), "--model", str(tiny_llama_dir), "--num-traces", "2",
        "--max-reasoning-tokens", "6", "--prompt-template", PLAIN, "--batch-size", "2", "--device", "cpu",
        "--out", str(out))
    stdout = capsys.readouterr().out
    assert "mean gain" in stdout and "beats no reasoning on" in stdout
    rows = read_rows(out)
    assert [(r["prefix"], r["ground_truth"]) for r in rows] == PAIRS  # deduplicated, in order
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    for r in rows:
        assert set(r) == set(ROW_FIELDS)
        assert r["prompt"] == PLAIN.replace("{text}", r["prefix"]) and r["completion"] == r["ground_truth"]
        assert len(r["traces"]) == len(r["all_scores"]) == 2 and r["think_close"] == CLOSE and not r["hint"]
        assert r["score"] == max(r["all_scores"]) and r["reasoning"] == r["traces"][r["best"]]
        assert r["gain"] == pytest.approx(r["score"] - r["baseline_score"])
        # the row's scores follow from its texts
        target = enc(r["ground_truth"])
        assert r["ground_truth_tokens"] == len(target)
        assert abs(r["score"] - plain_logprob(model, enc(r["prompt"]) + enc(r["reasoning"]) + enc(CLOSE), target)) < 1e-4
        assert abs(r["baseline_score"] - plain_logprob(model, enc(r["prompt"]) + enc(CLOSE), target)) < 1e-4
    assert all(math.isfinite(r["gain"]) for r in rows)

    # --hint: the ground truth shows in the sampling prompt only; the row's prompt and scores are the plain ones
    run("--from-rollouts", str(rollouts), "--model", str(tiny_llama_dir), "--num-traces", "2",
        "--max-reasoning-tokens", "4", "--prompt-template", PLAIN, "--hint", "--limit", "2", "--device", "cpu",
        "--out", str(out), "--force")
    rows = read_rows(out)
    assert len(rows) == 2 and all(r["hint"] for r in rows)
    for r in rows:
        assert r["ground_truth"] not in r["prompt"]
        assert abs(r["baseline_score"] - plain_logprob(model, enc(r["prompt"]) + enc(CLOSE),
                                                       enc(r["ground_truth"]))) < 1e-4


def test_the_gan_rl_runs_config_gives_the_prompt_format(tmp_path, tiny_llama_dir, capsys):
    """Rollouts in a GAN-RL run folder: its config.yaml gives the model, prompt template and think_close."""
    import yaml

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rollouts = write_rollouts(run_dir / "rollouts.jsonl")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {
        "class_path": "lightning_rlm.methods.GANRL",
        "init_args": {"model_name_or_path": str(tiny_llama_dir), "prompt_template": "[{text}]<think>",
                      "think_close": "</think>", "reasoning_tokens": 3}}}))
    out = tmp_path / "r.jsonl"
    run("--from-rollouts", str(rollouts), "--num-traces", "2", "--device", "cpu", "--out", str(out))
    assert "prompt format and model from" in capsys.readouterr().err
    for r in read_rows(out):
        assert r["prompt"] == f"[{r['prefix']}]<think>" and r["think_close"] == "</think>"


def test_rationalize_reads_a_gan_rl_run(tmp_path, tiny_chat_llama_dir, pile_file):
    """Stage 0 -> 1 as documented: a GAN-RL run's folder (rollouts.jsonl, config.yaml) is all rationalize needs;
    its prompts are the ones the run's GAN-RL renders (the seed's chat format here)."""
    from lightning_rlm.cli import RLMCLI

    cli = RLMCLI(args=["fit", "--config", str(CONFIGS / "gan_rl" / "rationalize_then_gan.yaml"),
                       "--model.init_args.model_name_or_path", str(tiny_chat_llama_dir),
                       "--data.init_args.tokenizer", str(tiny_chat_llama_dir), "--model.init_args.lora_rank=2",
                       "--model.init_args.reasoning_tokens=2", "--model.init_args.completion_tokens=4",
                       "--data.init_args.completion_tokens=4", "--data.init_args.batch_size=2",
                       "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.callbacks=[]",
                       "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
                       "--trainer.enable_model_summary=false", "--trainer.logger.init_args.save_dir",
                       str(tmp_path / "runs"), "--trainer.logger.init_args.version=gan0"])
    run_dir = Path(cli.trainer.log_dir)
    assert (run_dir / "rollouts.jsonl").is_file() and (run_dir / "config.yaml").is_file()
    out = tmp_path / "r.jsonl"
    run("--from-rollouts", str(run_dir / "rollouts.jsonl"), "--num-traces", "2", "--device", "cpu", "--out", str(out))
    rows = read_rows(out)
    assert len(rows) == 2
    for r in rows:
        assert r["prompt"] == cli.model.render_prompt(r["prefix"]) and r["think_close"] == cli.model.hparams.think_close


def test_rationalize_from_a_data_config(tmp_path, tiny_llama_dir, shared_data):
    import yaml

    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"class_path": "PrefixCompletionDataModule", "init_args": {
        "source": {"preset": "tinystories", "max_documents": 20}, "tokenizer": str(tiny_llama_dir),
        "completion_tokens": 8, "prefix_tokens": 16}}}))
    out = tmp_path / "r.jsonl"
    run("--config", str(cfg), "--model", str(tiny_llama_dir), "--num-traces", "2", "--max-reasoning-tokens", "3",
        "--prompt-template", PLAIN, "--limit", "2", "--device", "cpu", "--out", str(out))
    rows = read_rows(out)
    assert len(rows) == 2 and all(r["prefix"] and r["ground_truth"] for r in rows)


def refuse(capsys, *args: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["rationalize", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-rlm: error: "), err
    return err[0]


def test_refuses_an_existing_out_and_bad_input(tmp_path, tiny_llama_dir, capsys):
    rollouts = write_rollouts(tmp_path / "rollouts.jsonl")
    out = tmp_path / "rationales.jsonl"
    out.write_text("keep me\n")
    line = refuse(capsys, "--from-rollouts", str(rollouts), "--model", str(tiny_llama_dir), "--out", str(out))
    assert "exists; pass --force" in line and out.read_text() == "keep me\n"
    assert "--from-rollouts PATH or --config" in refuse(capsys, "--out", str(tmp_path / "new.jsonl"))
    assert "no such file" in refuse(capsys, "--from-rollouts", str(tmp_path / "nope.jsonl"), "--out",
                                    str(tmp_path / "new.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prefix": "x"}\n')
    assert "line 1 has no prefix and ground_truth" in refuse(capsys, "--from-rollouts", str(bad), "--model",
                                                             str(tiny_llama_dir), "--out", str(tmp_path / "n.jsonl"))
    assert "--num-traces must be >= 1" in refuse(capsys, "--from-rollouts", str(rollouts), "--num-traces", "0",
                                                 "--out", str(tmp_path / "n.jsonl"))
    assert not (tmp_path / "new.jsonl").exists() and not (tmp_path / "n.jsonl").exists()


# ----- stage 2: the SFT examples -----------------------------------------------------------------------------
def write_rationales(path: Path, n: int = 8) -> Path:
    rows = []
    for i in range(n):
        prefix, truth = PAIRS[i % len(PAIRS)]
        prompt = PLAIN.replace("{text}", prefix)
        rows.append(rationale_row(prefix=prefix, ground_truth=truth, prompt=prompt, think_close=CLOSE,
                                  traces=[f"the dog {i} is happy", f"so it goes on {i}"], scores=[-3.0, -2.0 + i],
                                  baseline_score=-2.5, ground_truth_tokens=5))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rationales_dm(path: Path, model_dir: Path, **kw):
    from lightning_rlm.data import RationalesDataModule, TextSource

    dm = RationalesDataModule(TextSource(path=str(path)), tokenizer=str(model_dir), batch_size=4, val_fraction=0.25,
                              **kw)
    dm.setup("fit")
    return dm


def test_sft_loss_mask_covers_reasoning_and_completion_only(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    from lightning_rlm.methods import SFTKLBarrier

    path = write_rationales(tmp_path / "rationales.jsonl")
    dm = rationales_dm(path, tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    rows = {json.loads(line)["reasoning"]: json.loads(line) for line in path.read_text().splitlines()}
    for ex in list(dm.train_set) + list(dm.val_set):
        row = next(r for r in rows.values() if ex["completion"].startswith(r["reasoning"]))
        r, c, a = enc(row["reasoning"]), enc(CLOSE), enc(row["completion"])
        assert ex["prompt_ids"] == enc(row["prompt"])  # the prompt is context, outside the target
        assert ex["completion_ids"] == r + c + a
        assert ex["loss_mask"] == [1] * len(r) + [0] * len(c) + [1] * len(a)
    batch = next(iter(dm.train_dataloader()))
    assert batch["loss_mask"].shape == batch["completion_ids"].shape
    assert not (batch["loss_mask"].bool() & ~batch["completion_mask"].bool()).any()  # never on padding

    # SFTKLBarrier's NLL is the mean over exactly those tokens, computed here from a plain forward
    model = SFTKLBarrier(model_name_or_path=str(tiny_llama_dir), lora_rank=2, lam=0.0, n_rounds=1)
    model.configure_model()
    nll = model.losses(batch)["nll"].item()
    total, count = 0.0, 0
    for i in range(batch["completion_ids"].shape[0]):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        target = batch["completion_ids"][i][batch["completion_mask"][i].bool()].tolist()
        with torch.no_grad():
            logp = model.policy(input_ids=torch.tensor([prompt + target])).logits[0].double().log_softmax(-1)
        for j, t in enumerate(target):
            if batch["loss_mask"][i, j]:
                total -= logp[len(prompt) - 1 + j, t].item()
                count += 1
    assert count == int(batch["loss_mask"].sum()) and abs(nll - total / count) < 1e-5

    # think_close in the loss on demand; min_gain keeps the rows whose best trace beats no reasoning by that much
    with_close = rationales_dm(path, tiny_llama_dir, train_think_close=True)
    assert all(ex["loss_mask"] == [1] * len(ex["completion_ids"]) for ex in with_close.train_set)
    kept = rationales_dm(path, tiny_llama_dir, min_gain=2.0)  # gains are i + 0.5: rows 2..7 stay
    assert len(kept.train_set) + len(kept.val_set) == 6


# ----- stage 3: GAN-RL from the SFT output ------------------------------------------------------------------
def lora_state(module) -> dict[str, torch.Tensor]:
    return {n.split("policy.", 1)[-1]: p.detach().clone() for n, p in module.named_parameters()
            if ".lora_" in n and n.startswith("policy.")}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_chat_llama_dir):
    """One SFT step of configs/sft_kl_barrier/rationalized_sft.yaml on the tiny chat Llama: its run folder."""
    from lightning_rlm.cli import RLMCLI

    tmp = tmp_path_factory.mktemp("sft")
    data = write_rationales(tmp / "rationales.jsonl")
    cli = RLMCLI(args=["fit", "--config", str(CONFIGS / "sft_kl_barrier" / "rationalized_sft.yaml"),
                       "--model.init_args.model_name_or_path", str(tiny_chat_llama_dir),
                       "--data.init_args.tokenizer", str(tiny_chat_llama_dir),
                       "--data.init_args.source.path", str(data), "--model.init_args.lr=0.01",
                       "--model.init_args.eval_prompts=2", "--model.init_args.eval_max_new_tokens=4",
                       "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu",
                       "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                       "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
                       "--trainer.logger.init_args.version=sft"])
    assert cli.trainer.global_step == 1
    return Path(cli.trainer.log_dir), lora_state(cli.model)


def test_gan_rl_starts_from_the_sft_adapter(sft_run, tmp_path, tiny_chat_llama_dir, capsys):
    from lightning_rlm.cli import RLMCLI

    run_dir, sft = sft_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert any(n.endswith("lora_B.default.weight") and v.abs().max() > 0 for n, v in sft.items())  # trained

    def gan(*extra: str):
        model = RLMCLI(args=["--config", str(CONFIGS / "gan_rl" / "rationalize_then_gan.yaml"),
                            "--model.init_args.model_name_or_path", str(tiny_chat_llama_dir),
                            "--data.init_args.tokenizer", str(tiny_chat_llama_dir),
                            # bundled windows (the config's Pile sample does not travel with the package)
                            "--data.init_args.source.preset=tinystories", "--data.init_args.source.max_documents=60",
                            *extra], run=False).model
        model.configure_model()  # the generator and its adapter are created here (fit calls it)
        return model

    fresh = lora_state(gan())
    assert all(v.abs().max() == 0 for n, v in fresh.items() if "lora_B" in n)  # without init_adapter: B = 0
    # from the SFT run folder (its last.ckpt): the adapter at step 0 is the SFT output's
    model = gan("--model.init_args.init_adapter", str(run_dir))
    assert model.global_step == 0
    got = lora_state(model)
    assert got.keys() == sft.keys()
    assert all(torch.equal(got[n], sft[n]) for n in sft)
    # from the exported PEFT adapter folder (lightning-rlm export without --merge): the same weights
    exported = tmp_path / "sft_adapter"
    assert main(["export", "--ckpt_path", str(run_dir), "--out", str(exported)]) is None
    got = lora_state(gan("--model.init_args.init_adapter", str(exported)))
    assert all(torch.equal(got[n], sft[n]) for n in sft)
    # the exported adapter also samples traces (a next round of rationalization), in the seed's chat format
    out = tmp_path / "round2.jsonl"
    run("--from-rollouts", str(write_rollouts(tmp_path / "rollouts.jsonl")), "--model", str(exported), "--chat",
        "--num-traces", "2", "--max-reasoning-tokens", "3", "--limit", "1", "--device", "cpu", "--out", str(out))
    (row,) = read_rows(out)
    assert row["prompt"].startswith("<|im_start|>system\nYou act as a causal model of language.")
    assert row["prompt"].endswith("<|im_start|>assistant\n<think>\n") and "<prefix>\n" + row["prefix"] in row["prompt"]


def test_gan_rl_init_adapter_refuses_a_mismatch(sft_run, tiny_chat_llama_dir, tmp_path):
    from lightning_rlm.methods import GANRL

    run_dir, _ = sft_run
    with pytest.raises(ValueError, match="set lora_rank / lora_alpha / use_rslora to match"):
        GANRL(model_name_or_path=str(tiny_chat_llama_dir), lora_rank=8, init_adapter=str(run_dir))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        GANRL(model_name_or_path=str(tiny_chat_llama_dir), init_adapter=str(tmp_path / "missing"))
