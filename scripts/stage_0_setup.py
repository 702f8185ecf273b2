#!/usr/bin/env python
"""Stage 0: corpus, tokenizer, token files and the pretrained model (shared by all seeds).

Hub presets download the model and data once (run it on a login node with
internet); later stages then work with HF_HUB_OFFLINE=1. The tiny preset builds
everything from the local Python standard library's docstrings.
"""
import _bootstrap  # noqa: F401

from utils.cli import run_stage
from utils.stages import setup

if __name__ == "__main__":
    raise SystemExit(run_stage("stage_0_setup", __doc__, setup, ("model", "data", "pretrain"), shared=True))
