#!/usr/bin/env python
"""Stage 3: recovery-train the monotone model from `monotonic_init` (the monotone arm).

Saves models/monotonic (last) and models/monotonic_best, results/training_monotonic.json
(history, weight movement, certificate). Checkpoints under
checkpoints/monotonic/; a rerun resumes from the newest one. SIGUSR1 or SIGTERM:
checkpoint, then exit 75 without the completion flag.
Several processes (GPUs, or CPU processes with gloo) train one FSDP2-sharded model:
    torchrun --nproc_per_node N scripts/stage_3_train_monotonic.py --preset ... (checkpoints resume at any N).
"""
import _bootstrap  # noqa: F401

from utils.pipeline import STAGE
from utils.run.cli import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE["stage_3_train_monotonic"], __doc__))
