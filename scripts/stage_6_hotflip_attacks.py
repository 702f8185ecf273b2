#!/usr/bin/env python
"""Stage 6: the searches of HotFlip's threat model (at most attack.hotflip_max_flips tokens
swapped) against every model: HotFlip (Ebrahimi et al. 2018), GCG (Zou et al. 2023), GCG
through the exact-GELU surrogate gradient (BPDA) and a gradient-free random search with GCG's
budget (attack.text_attacks picks them), each with a random-flip control and the transfer of
each model's adversarial texts to every other model; then the worst case per text and the
gradient-masking checks, and PGD on the input embeddings (attack.pgd_radii).

Writes results/<search>.json (success rate at attack.success_threshold beside the absolute
delta-NLL; per-example records with original and adversarial ids, modified positions, clean
and attacked NLL, cost and convergence trace), results/worst_case.json, results/pgd.json and
results/pgd_deltas/<arm>.safetensors. Under torchrun each rank attacks a share of the texts.
"""
import _bootstrap  # noqa: F401

from utils.pipeline import STAGE
from utils.run.cli import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE["stage_6_hotflip_attacks"], __doc__))
