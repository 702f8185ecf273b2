#!/usr/bin/env python
"""Stage 4: rolling-window perplexity on the held-out test split for every model
that exists (pretrained, monotonic_init, baseline, monotonic).

Writes results/evaluation.json: per model its path, perplexity, mean NLL, tokens
scored, bits per byte and per-document (NLL, tokens); the token file and the
exact scoring convention, so the numbers can be recomputed independently.
Under torchrun each rank scores a share of the documents (and of the tasks).
"""
import _bootstrap  # noqa: F401

from utils.pipeline import STAGE
from utils.run.cli import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE["stage_4_evaluate"], __doc__))
