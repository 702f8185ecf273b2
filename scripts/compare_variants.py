#!/usr/bin/env python
"""After an ablation grid (run_all.sh --grid): the variants side by side in WORK_DIR/final/
comparison.json and comparison.md, read from each variant's stage 7 results.

    python scripts/compare_variants.py --work-dir WORK_DIR
"""
import _bootstrap  # noqa: F401

import sys
from pathlib import Path

from configs.experiment_config import ConfigError
from utils.results.comparison import write_comparison
from utils.run.cli import EXIT_CONFIG, config_from_args, one_line_on_failure, stage_parser
from utils.run.run_files import RunPaths, write_flag


def main() -> int:
    args = stage_parser(__doc__).parse_args()      # the stage flags, so SLURM runs it like a stage
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    work = Path(cfg.work_dir)
    def compare():
        outputs = write_comparison(work)
        write_flag(work / "final" / "flags" / "compare_variants.done", "always-rerun", outputs, RunPaths(work, cfg.seed))
    return one_line_on_failure("compare_variants", compare)


if __name__ == "__main__":
    raise SystemExit(main())
