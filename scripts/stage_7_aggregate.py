#!/usr/bin/env python
"""Stage 7: aggregate every seed of a work dir into WORK_DIR/final/: final_results.json,
results.md, table.tex (booktabs) and plots, with intervals and paired tests.

A seed with missing stage outputs is an error naming what is missing, unless
--allow-partial (then what exists is aggregated and marked partial everywhere).
"""
import _bootstrap  # noqa: F401

import sys
from pathlib import Path

from configs.experiment_config import ConfigError
from utils.results.aggregate import run_aggregate
from utils.run.cli import EXIT_CONFIG, config_from_args, one_line_on_failure, stage_parser
from utils.run.run_files import RunPaths, write_flag


def main() -> int:
    p = stage_parser(__doc__)
    p.add_argument("--seeds", help="comma-separated seeds (default: every seed_<S> in the work dir)")
    p.add_argument("--allow-partial", action="store_true", help="aggregate incomplete seeds, marked partial")
    args = p.parse_args()
    try:
        cfg = config_from_args(args)
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    work = Path(cfg.work_dir)
    if work.exists() and not work.is_dir():
        print(f"error: [stage_7_aggregate] work dir {work} is a file, not a directory", file=sys.stderr)
        return EXIT_CONFIG
    def aggregate():
        outputs = run_aggregate(work, seeds, args.allow_partial, cfg.preset, cfg.analysis)
        write_flag(work / "final" / "flags" / "stage_7_aggregate.done", "always-rerun", outputs, RunPaths(work, cfg.seed))
    return one_line_on_failure("stage_7_aggregate", aggregate)


if __name__ == "__main__":
    raise SystemExit(main())
