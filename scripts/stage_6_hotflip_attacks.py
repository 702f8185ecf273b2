#!/usr/bin/env python
"""Stage 6: HotFlip (Ebrahimi et al. 2018) and GCG (Zou et al. 2023) under HotFlip's
threat model against every model, with a random-flip control and transfer of each
model's adversarial texts to every other model (attack.text_attacks picks the searches).

Writes results/hotflip.json and results/gcg.json: success rate at
attack.success_threshold beside the absolute delta-NLL, and per-example records
(original and adversarial ids, modified positions, clean and attacked NLL, cost).
Under torchrun each rank attacks a share of the texts.
"""
import _bootstrap  # noqa: F401

from utils.pipeline import STAGE
from utils.run.cli import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE["stage_6_hotflip_attacks"], __doc__))
