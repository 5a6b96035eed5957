"""What each method costs on a real chat model: seconds per training step, peak memory and the share of the
step spent generating, for every `configs/<method>/smollm2_*.yaml` (SmolLM2-135M-Instruct), on this machine.

Each config runs in its own process (`--one`): LightningCLI builds it as `lightning-rlm fit` would, with the
config's own sizes (or `--small` for quick, reduced ones), for `--steps` steps after one warm-up step;
validation is off. Generation time is the time inside `sample_completions` (the RL methods' rollouts, GAN-RL's
two phases, KL-barrier rounds) or inside the model's own `generate` (samples); peak memory is the process's
maximum resident set size. `--precision bf16-mixed` measures bf16 autocast on the CPU (this CPU has
`avx512_bf16`). The table is printed as Markdown.

    python benchmarks/real_model_cost.py [--steps 3] [--small] [--precision 32-true] [--only grpo/smollm2_lora]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*/smollm2_*.yaml"))
sys.path.insert(0, str(ROOT / "tests"))


def _small(method: str) -> list[str]:
    from test_smollm2 import SMALL  # the reduced sizes of the slow test

    return SMALL[method]


def one(config: Path, steps: int, precision: str, small: bool) -> dict:
    import lightning as L

    import lightning_rlm.rollout.generate as gen
    from lightning_rlm.cli import RLMCLI

    spent = {"generate": 0.0}

    def timed(fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["generate"] += time.perf_counter() - t
        return wrapper

    original = gen.sample_completions
    patched = timed(original)
    for module in list(sys.modules.values()):  # methods import the function by name
        if getattr(module, "sample_completions", None) is original:
            module.sample_completions = patched

    class StepTimes(L.Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[float, float]] = []  # (step seconds, generation seconds)
            self._t = self._g = 0.0

        def on_train_batch_start(self, *args) -> None:
            self._t, self._g = time.perf_counter(), spent["generate"]

        def on_train_batch_end(self, *args) -> None:
            self.rows.append((time.perf_counter() - self._t, spent["generate"] - self._g))

    timer = StepTimes()
    args = ["--config", str(config), *(_small(config.parent.name) if small else []),
            f"--trainer.max_steps={steps + 1}", "--trainer.limit_val_batches=0", f"--trainer.precision={precision}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
            # configs, completions and rollouts the callbacks write go to a scratch folder, not the working one
            f"--trainer.default_root_dir={tempfile.mkdtemp(prefix='lrlm-bench-')}"]
    cli = RLMCLI(args=args, run=False)
    cli.trainer.callbacks.append(timer)
    for cb in list(cli.trainer.callbacks):  # no checkpoint files from a benchmark
        if type(cb).__name__ == "RunCheckpoint":
            cli.trainer.callbacks.remove(cb)
    if hasattr(cli.model, "sample_every_n_steps"):
        cli.model.sample_every_n_steps = 0
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    rows = timer.rows[1:]  # after the warm-up step
    step = statistics.median(r[0] for r in rows)
    gen_share = sum(r[1] for r in rows) / max(1e-9, sum(r[0] for r in rows))
    return {"config": f"{config.parent.name}/{config.stem}", "precision": precision, "steps": len(rows),
            "s_per_step": step, "gen_share": gen_share, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, or both")
    p.add_argument("--small", action="store_true", help="the slow test's reduced sizes, not the configs' own")
    p.add_argument("--only", action="append", default=[], help="config folder/stem prefix (repeatable)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(Path(a.one), a.steps, a.precision, a.small)), flush=True)
        return
    precisions = ["32-true", "bf16-mixed"] if a.precision == "both" else [a.precision]
    configs = [c for c in CONFIGS if not a.only or any(f"{c.parent.name}/{c.stem}".startswith(o) for o in a.only)]
    print("| config | precision | s/step | generation share | peak RSS (GB) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for config in configs:
        for precision in precisions:
            cmd = [sys.executable, __file__, "--one", str(config), "--steps", str(a.steps), "--precision", precision,
                   *(["--small"] if a.small else [])]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                err = (out.stderr.strip().splitlines() or ["?"])[-1]
                print(f"| {config.parent.name}/{config.stem} | {precision} | failed: {err[:80]} | | |", flush=True)
                continue
            r = json.loads(line[len("RESULT "):])
            print(f"| {r['config']} | {precision} | {r['s_per_step']:.2f} | {r['gen_share']:.0%} | "
                  f"{r['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
