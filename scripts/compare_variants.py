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
from utils.run.cli import EXIT_CONFIG, EXIT_FAILED, config_from_args, os_error_line, stage_parser
from utils.run.run_files import PipelineError, RunPaths, write_flag


def main() -> int:
    args = stage_parser(__doc__).parse_args()      # the stage flags, so SLURM runs it like a stage
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    work = Path(cfg.work_dir)
    try:
        outputs = write_comparison(work)
        write_flag(work / "final" / "flags" / "compare_variants.done", "always-rerun", outputs, RunPaths(work, cfg.seed))
    except PipelineError as e:
        print(f"error: [compare_variants] {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(os_error_line("compare_variants", e), file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
