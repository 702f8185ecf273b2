#!/usr/bin/env python
"""Stage 5: Universal Adversarial Triggers (Wallace et al. 2019) against every model.

Each model's trigger is optimised on one set of test texts and evaluated on a
disjoint set; every trigger is also measured on every other model (transfer).
Writes results/uat.json with per-text records (text ids, clean and triggered NLL)
and the exact cost of each search. Under torchrun the ranks share every query's batches.
"""
import _bootstrap  # noqa: F401

from utils.pipeline import STAGE
from utils.run.cli import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE["stage_5_uat_attacks"], __doc__))
