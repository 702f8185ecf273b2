#!/usr/bin/env python
"""Stage 0: corpus, tokenizer, token files and the pretrained model (shared by all seeds).

Hub presets fetch the model and data once into the Hugging Face cache (run it
where the hub is reachable, e.g. a login node; it needs no GPU), or read them
from a copied cache with HF_HUB_OFFLINE=1, or from local files
(model.source=local, data.source=jsonl.zst). Later stages then work offline.
The tiny preset builds everything from the local Python standard library's docstrings.
"""
import _bootstrap  # noqa: F401

from utils.pipeline import STAGE
from utils.run.cli import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE["stage_0_setup"], __doc__))
