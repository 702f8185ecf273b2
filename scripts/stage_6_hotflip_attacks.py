#!/usr/bin/env python
"""Stage 6: HotFlip (Ebrahimi et al. 2018) against every model, with a random-flip
control and transfer of each model's adversarial texts to every other model.

Writes results/hotflip.json: success rate at attack.success_threshold beside the
absolute delta-NLL, and per-example records (original and adversarial ids,
modified positions, clean and attacked NLL).
"""
import _bootstrap  # noqa: F401

from utils.cli import run_stage
from utils.measurement import ATTACK_SECTIONS, arms_fingerprint, run_hotflip

if __name__ == "__main__":
    raise SystemExit(run_stage("stage_6_hotflip_attacks", __doc__, run_hotflip, ATTACK_SECTIONS,
                               inputs=arms_fingerprint))
