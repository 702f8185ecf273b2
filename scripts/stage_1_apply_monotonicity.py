#!/usr/bin/env python
"""Stage 1: make the MLP sublayers monotone, certify it, save `monotonic_init`.

Writes results/monotonicity_certificate.json; a run configured monotone
(monotone.activation=monotone) whose certificate fails exits non-zero.
"""
import _bootstrap  # noqa: F401

from utils.pipeline import STAGE
from utils.run.cli import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE["stage_1_apply_monotonicity"], __doc__))
