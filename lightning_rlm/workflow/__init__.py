"""Experiment workflow: grid sweeps from one command, and results tables across seeds.

    lightning-rlm sweep --config CFG --grid KEY=V1,V2 [--grid seed_everything=1,2] [-- extra args]
    lightning-rlm report SWEEP_DIR [--metric TAG ...] [--threshold TAG=VALUE ...] [--plot]

`sweep` runs (locally or as a SLURM job array through submitit) one `fit` per point of the grid, each in
its own folder of one sweep folder, and can be re-started: finished runs are skipped, unfinished ones
resume from their `last.ckpt`. `report` reads the runs' TensorBoard events and tabulates the final
metrics and the time to reach thresholds, mean ± std over seeds, one row per setting.
"""

from lightning_rlm.workflow.sweep import Run, expand_grid, parse_grid, plan_sweep, run_name

__all__ = ["Run", "expand_grid", "parse_grid", "plan_sweep", "run_name"]
from lightning_rlm.workflow.factorial import AscentProposal, round_clean, steepest_ascent  # noqa: E402

__all__ += ["AscentProposal", "round_clean", "steepest_ascent"]
