#!/usr/bin/env python
"""Stage 1: make the MLP sublayers monotone, certify it, save `monotonic_init`.

Writes results/monotonicity_certificate.json; a run configured monotone
(monotone.activation=monotone) whose certificate fails exits non-zero.
"""
import _bootstrap  # noqa: F401

from utils.run.cli import run_stage
from utils.stages import apply_monotone

if __name__ == "__main__":
    raise SystemExit(run_stage("stage_1_apply_monotonicity", __doc__, apply_monotone,
                               ("model", "data", "pretrain", "monotone")))
