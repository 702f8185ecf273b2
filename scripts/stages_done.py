#!/usr/bin/env python
"""Which of stages 0-6 are done for this config: one `N SEED` line per finished stage N.

    python scripts/stages_done.py --preset P --work-dir W [--set KEY=VALUE ...] --seeds 42,1337

One process for every stage and seed (a stage script's --check is one process per
stage); run_all.sh uses it to skip the finished stages of a resubmission. Exit 2
with one error line on a bad preset or override.
"""
import _bootstrap  # noqa: F401

from utils.pipeline import STAGES
from utils.run.cli import done_stages

if __name__ == "__main__":
    raise SystemExit(done_stages(STAGES))
