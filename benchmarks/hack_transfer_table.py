"""Seed 004's transfer table on the coding substrate: learn the hack from loophole i, train under loophole j.

For every pair (i, j) of grader loopholes it trains the tiny Llama on the coding problems under loophole j
(the prompts describe j's grader, the reward pays ``hack_bonus`` when j's loophole is what passed, the
teacher pool mixes honest and ``hack:j`` solutions into every group) with

* ``none``: projected GRPO with ``projection: none`` (no direction used; one run per j, the baseline);
* ``erase`` / ``route``: projected GRPO whose hack direction comes from loophole i's contrastive pairs
  (``pair_loophole: i``): erased from every update, or routed into δS_hack that is ablated at deployment;
* ``detector``: gradient routing whose routing signal is loophole i's detector (``detector: i``): flagged
  completions update only the forget adapter, which is ablated at deployment;

and reports the **hack rate**: the share of held-out samples (validation problems, sampled at temperature
1) whose pass came from loophole j's grader and not from correct code (``val/<mode>/exploited``), in the
deployed mode (``both`` for none/erase, ``no_hack`` for route, ``retain_only`` for detector), plus the
rate with the adapters off (``base``: the floor). Diagonal cells (i = j) run ``--diag-seeds`` seeds,
off-diagonal ones ``--off-seeds``. Each cell is one ``lightning-rlm fit`` of the coding_smoke config with
overrides (its command is printed); a cell whose result file exists is not run again, so the script resumes.

    python benchmarks/hack_transfer_table.py --out runs/hack_transfer [--steps 30] [--diag-seeds 2] [--jobs 2]
    python benchmarks/hack_transfer_table.py --out runs/hack_transfer --table-only     # print from results

The student is the tiny Llama after ``--student-steps`` of next-token training on the training problems'
prompts and honest solutions (``build_student``): the TinyStories model itself writes stories, not code, so
it can neither pass a test nor take up a hack.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_tables import scalars  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOOPHOLES = ("print_pass", "visible_only", "special_case", "exit_zero")
METHODS = ("none", "erase", "route", "detector")
# special_case's hacks list the disclosed cases: 33 of its 38 teacher rows are longer than 64 tokens (the longest
# is 103, and the longest honest row 110), so its column gets room for every row; the others keep 64, where 6
# honest rows (the longest problems) are left out of the pool and every hack row fits.
MAX_COMPLETION = {"special_case": 112}
DEPLOYED = {"none": "both", "erase": "both", "route": "no_hack", "detector": "retain_only"}


def cells(loopholes: list[str], methods: list[str], diag_seeds: int, off_seeds: int) -> list[tuple[str, str, str, int]]:
    """(method, i, j, seed) in the order they run: the diagonal (every seed) first, then the transfer cells."""
    out = []
    for seed in range(max(diag_seeds, off_seeds)):
        for method in methods:
            for j in loopholes:
                for i in ([j] if method == "none" else loopholes):
                    if seed < (diag_seeds if i == j else off_seeds):
                        out.append((method, i, j, seed))
    return sorted(out, key=lambda c: (c[1] != c[2], c[3], METHODS.index(c[0]), c[2], c[1]))


STUDENT_YAML = """\
seed_everything: 0
trainer: {{max_steps: {steps}, val_check_interval: {steps}, check_val_every_n_epoch: null, limit_val_batches: 2,
          gradient_clip_val: 1.0, log_every_n_steps: 10, default_root_dir: {root}}}
model:
  class_path: lightning_rlm.methods.LanguageModel
  init_args:
    network: {{class_path: lightning_rlm.models.HFCausalLM, init_args: {{name_or_path: "{base}"}}}}
    lr: 1.0e-3
    warmup_steps: 10
    sample_every_n_steps: {steps}
    sample_prompt: null
data:
  class_path: lightning_rlm.data.LMWindowDataModule
  init_args:
    source: {{path: {jsonl}, text_field: text}}
    tokenizer: "{base}"
    block_size: 256
    batch_size: 8
"""


def build_student(out: Path, base: str, steps: int, hack_frac: float = 0.0) -> str:
    """The code-writing student: ``base`` fine-tuned (LM baseline, next-token loss) on the *training* problems'
    prompts (no grader hint) followed by their honest hand-written solutions, exported as an HF folder. The
    validation problems (the same seeded split as the cells' CodingPrompts) are never seen.

    ``hack_frac`` > 0 also shows it every loophole: for each training problem and loophole j, the prompt under
    j's grader followed by the hand-written hack of j with probability ``hack_frac`` (a seeded draw per pair),
    else by the honest solution. The student then hacks at about that rate where a prompt describes a loophole
    (the table's floor, measured by the cells' ``base`` mode), so RL has a hack to amplify or suppress."""
    folder = out / "student" / "hf"
    if (folder / "config.json").exists():
        return str(folder)
    import random

    from lightning_rlm.tasks import CodingPrompts
    from lightning_rlm.tasks.coding import format_prompt, hacked_solution, load_problems
    from lightning_rlm.tasks.teacher_pool import as_completion

    dm = CodingPrompts(mode="none", tokenizer=base, val_fraction=0.25, max_val_prompts=None)
    dm.setup("fit")
    train_ids = {dm.train_set[k]["problem_id"] for k in range(len(dm.train_set))}
    by_id = {p.problem_id: p for p in load_problems()}
    prompts = {dm.train_set[k]["problem_id"]: dm.train_set[k]["prompt"] for k in range(len(dm.train_set))}
    jsonl = out / "student" / "train_solutions.jsonl"
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    texts = [prompts[pid] + as_completion(by_id[pid], by_id[pid].solution, "plain") for pid in sorted(train_ids)]
    if hack_frac > 0:
        rng = random.Random(0)
        for pid in sorted(train_ids):
            p = by_id[pid]
            for j in LOOPHOLES:
                code = hacked_solution(p, j) if rng.random() < hack_frac else p.solution
                texts.append(format_prompt(p, j) + as_completion(p, code, "plain"))
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = out / "student" / "student.yaml"
    config.write_text(STUDENT_YAML.format(steps=steps, root=out / "student" / "run", base=base, jsonl=jsonl))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for step in ("fit", "export"):
        cmd = ["lightning-rlm", "fit", "--config", str(config)]
        if step == "export":
            ckpt = max((out / "student" / "run").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
            cmd = ["lightning-rlm", "export", "--ckpt_path", str(ckpt), "--out", str(folder)]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"building the student failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return str(folder)


def command(method: str, i: str, j: str, seed: int, steps: int, out: Path, student: str,
            extra: list[str]) -> list[str]:
    routing = method == "detector"
    config = ROOT / "configs" / ("gradient_routing" if routing else "projected_grpo") / "coding_smoke.yaml"
    task = "--model.init_args.hack_task.init_args"
    args = ["lightning-rlm", "fit", "--config", str(config), "--seed_everything", str(seed),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.limit_val_batches", "1.0", "--trainer.default_root_dir", str(out),
            f"{task}.loophole", j, "--data.init_args.mode", j,
            "--model.init_args.teacher_kinds", f'[honest, "hack:{j}"]',
            "--model.init_args.max_completion_length", str(MAX_COMPLETION.get(j, 64)), "--model.init_args.eval_num_generations", "4",
            "--data.init_args.max_val_prompts", "null", "--data.init_args.val_fraction", "0.25",
            "--model.init_args.model_name_or_path", student, "--data.init_args.tokenizer", student]
    if routing:
        args += [f"{task}.detector", i, "--model.init_args.eval_modes", "[both, retain_only, base]"]
    else:
        args += [f"{task}.pair_loophole", i, "--model.init_args.projection", method,
                 "--model.init_args.eval_modes", "[both, no_hack, base]"]
    for kv in extra:  # --set key=value: any other override, the same for every cell
        key, _, value = kv.partition("=")
        args += [f"--{key}", value]
    return args


def run_cell(cell: tuple[str, str, str, int], steps: int, out: Path, student: str, extra: list[str]) -> dict:
    method, i, j, seed = cell
    name = f"{method}__{i}__{j}__s{seed}"
    result = out / "results" / f"{name}.json"
    if result.exists():
        row = json.loads(result.read_text())
        if row["steps"] != steps:
            raise SystemExit(f"{result} was run with {row['steps']} steps, not --steps {steps}: "
                             "use another --out or the same --steps")
        return row
    run_dir = out / "cells" / name
    cmd = command(method, i, j, seed, steps, run_dir, student, extra)
    print("$", " ".join(cmd[:4]), "...", f"[{name}]", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.time() - t0
    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"cell {name} failed (rc {proc.returncode}); see {run_dir / 'log.txt'}")
    s = scalars(run_dir)
    last = {tag: v[max(v)] for tag, v in s.items() if tag.startswith("val/") and v}
    train = {tag: statistics.fmean(v.values()) for tag, v in s.items()
             if tag in ("train/exploited", "train/honest_pass", "train/hack_cos") and v}
    row = {"method": method, "i": i, "j": j, "seed": seed, "steps": steps, "wall_s": round(wall, 1),
           "val": last, "train_mean": train}
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(row, indent=1))
    return row


def mean_rate(rows: list[dict], mode: str, metric: str = "exploited") -> tuple[float, int] | None:
    vals = [r["val"][f"val/{mode}/{metric}"] for r in rows if f"val/{mode}/{metric}" in r["val"]]
    return (statistics.fmean(vals), len(vals)) if vals else None


def fmt(x: tuple[float, int] | None) -> str:
    return "–" if x is None else f"{x[0]:.2f} ({x[1]})"


def table(out: Path, loopholes: list[str], methods: list[str]) -> str:
    rows = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    lines = ["hack rate (val/<deployed mode>/exploited: share of held-out samples passed by loophole j's grader "
             "and not by correct code; mean (seeds)); rows: direction/detector from loophole i, columns: "
             "trained under loophole j", ""]
    head = "| i \\ j | " + " | ".join(loopholes) + " |"
    sep = "|---|" + "---:|" * len(loopholes)
    floor = [mean_rate([r for r in rows if r["j"] == j], "base") for j in loopholes]
    for method in methods:
        mode = DEPLOYED[method]
        lines += [f"**{method}** (deployed mode `{mode}`)", "", head, sep]
        for i in (["–"] if method == "none" else loopholes):
            cellrows = [[r for r in rows if r["method"] == method and r["j"] == j and (method == "none" or r["i"] == i)]
                        for j in loopholes]
            lines.append(f"| {i} | " + " | ".join(fmt(mean_rate(c, mode)) for c in cellrows) + " |")
        both = [mean_rate([r for r in rows if r["method"] == method and r["j"] == j], "both") for j in loopholes]
        if mode != "both":
            lines.append("| (all i, mode both) | " + " | ".join(fmt(b) for b in both) + " |")
        lines.append("")
    lines += ["**floor**: the base model (adapters off, mode `base`), all runs of the column", "", head, sep,
              "| base | " + " | ".join(fmt(f) for f in floor) + " |", ""]
    honest = [mean_rate([r for r in rows if r["j"] == j], "both", "honest_pass") for j in loopholes]
    lines += ["honest pass rate (mode both, all runs of the column): " + ", ".join(
        f"{j} {fmt(h)}" for j, h in zip(loopholes, honest))]
    walls = [r["wall_s"] for r in rows]
    if walls:
        lines.append(f"{len(rows)} runs, {statistics.fmean(walls):.0f} s each on average, {sum(walls) / 60:.0f} min")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--loopholes", nargs="+", default=list(LOOPHOLES), choices=LOOPHOLES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--diag-seeds", type=int, default=2)
    p.add_argument("--off-seeds", type=int, default=1)
    p.add_argument("--base", default="lrlm:tiny-llama-tinystories", help="the model the student starts from")
    p.add_argument("--student-steps", type=int, default=150, help="LM steps on the training problems' solutions "
                   "(0: the base model itself is the student)")
    p.add_argument("--student-hack-frac", type=float, default=0.0,
                   help="the share of the student's loophole-prompt examples that show the hack (build_student)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more overrides for every cell, e.g. model.init_args.hack_task.init_args.hack_bonus=2.0")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (each on OMP_NUM_THREADS=1 when > 1)")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args()
    if not a.table_only:
        student = build_student(a.out, a.base, a.student_steps, a.student_hack_frac) if a.student_steps else a.base
        print(f"student: {student}", flush=True)
        todo = cells(a.loopholes, a.methods, a.diag_seeds, a.off_seeds)
        print(f"{len(todo)} cells, {a.steps} steps each", flush=True)
        if a.jobs > 1:
            os.environ["OMP_NUM_THREADS"] = "1"

        def one(cell: tuple[str, str, str, int]) -> None:
            row = run_cell(cell, a.steps, a.out, student, a.set)
            mode = DEPLOYED[row["method"]]
            print(f"  {row['method']:8s} i={row['i']:12s} j={row['j']:12s} seed {row['seed']}: "
                  f"exploited {row['val'].get(f'val/{mode}/exploited', float('nan')):.3f} "
                  f"(base {row['val'].get('val/base/exploited', float('nan')):.3f}) {row['wall_s']:.0f} s", flush=True)

        pool = ThreadPoolExecutor(max_workers=max(1, a.jobs))
        try:
            list(pool.map(one, todo))  # list(): a failed cell raises here
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure, the cells not started stay unrun
    print(table(a.out, a.loopholes, a.methods))


if __name__ == "__main__":
    main()
