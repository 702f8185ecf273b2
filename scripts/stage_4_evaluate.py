#!/usr/bin/env python
"""Stage 4: rolling-window perplexity on the held-out test split for every model
that exists (pretrained, monotonic_init, baseline, monotonic).

Writes results/evaluation.json: per model its path, perplexity, mean NLL, tokens
scored, bits per byte and per-document (NLL, tokens); the token file and the
exact scoring convention, so the numbers can be recomputed independently.
Under torchrun each rank scores a share of the documents (and of the tasks).
"""
import _bootstrap  # noqa: F401

from utils.measurement import EVAL_SECTIONS, arms_fingerprint, evaluate
from utils.run.cli import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("stage_4_evaluate", __doc__, evaluate, EVAL_SECTIONS, inputs=arms_fingerprint,
                               multiprocess=True))
