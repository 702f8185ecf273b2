"""Stages 0-6 as one table: what each runs and what its completion flag covers.

The stage scripts run one entry each (utils.run.cli.run_stage); run_all.sh asks
scripts/stages_done.py, which reads the whole table in one process, which of them
a resubmission can skip.
"""
from configs.experiment_config import listed
from utils.measurement import ATTACK_SECTIONS, EVAL_SECTIONS, arms_fingerprint, evaluate, measured_dir, run_uat
from utils.recovery import SECTIONS, STAGE_3_SECTIONS, checkpoint_dir, recover, train_monotonic
from utils.run.cli import Stage
from utils.stages import apply_monotone, setup, setup_inputs
from utils.text_attacks import run_text_attacks

STAGES = [
    Stage("stage_0_setup", setup, ("model", "data", "pretrain"), shared=True, inputs=setup_inputs),
    Stage("stage_1_apply_monotonicity", apply_monotone, ("model", "data", "pretrain", "monotone")),
    Stage("stage_2_train_baseline", lambda cfg, paths: recover(cfg, paths, "baseline"), SECTIONS["baseline"],
          multiprocess=True, checkpoints=lambda cfg, paths: [checkpoint_dir(paths, "baseline")]),
    Stage("stage_3_train_monotonic", train_monotonic, STAGE_3_SECTIONS, multiprocess=True,
          checkpoints=lambda cfg, paths: [checkpoint_dir(paths, a) for a in ("monotonic", "unconstrained_from_init")]
          + sorted(checkpoint_dir(paths, "x").parent.glob("ladder_*"))),
    # Stages 4-6 keep each arm's measurement (utils.measurement.MeasuredOnce); --force sets them aside.
    Stage("stage_4_evaluate", evaluate, EVAL_SECTIONS, inputs=arms_fingerprint, multiprocess=True,
          checkpoints=lambda cfg, paths: [measured_dir(paths, "stage_4_evaluate")]),
    Stage("stage_5_uat_attacks", run_uat, ATTACK_SECTIONS, inputs=arms_fingerprint, multiprocess=True,
          checkpoints=lambda cfg, paths: [measured_dir(paths, "stage_5_uat_attacks")]),
    Stage("stage_6_hotflip_attacks", run_text_attacks, ATTACK_SECTIONS, inputs=arms_fingerprint, multiprocess=True,
          checkpoints=lambda cfg, paths: [measured_dir(paths, f"stage_6_{a}") for a in listed(cfg.attack.text_attacks)]),
]
STAGE = {s.name: s for s in STAGES}
