#!/usr/bin/env python
"""Stage 2: recovery-train the pretrained model (the baseline arm).

Saves models/baseline (last) and models/baseline_best, results/training_baseline.json
(history, weight movement). Checkpoints under
checkpoints/baseline/; a rerun resumes from the newest one. SIGUSR1 or SIGTERM:
checkpoint, then exit 75 without the completion flag.
Several processes (GPUs, or CPU processes with gloo) train one FSDP2-sharded model:
    torchrun --nproc_per_node N scripts/stage_2_train_baseline.py --preset ... (checkpoints resume at any N).
"""
import _bootstrap  # noqa: F401

from utils.pipeline import STAGE
from utils.run.cli import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE["stage_2_train_baseline"], __doc__))
