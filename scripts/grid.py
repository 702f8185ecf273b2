#!/usr/bin/env python3
"""Ablation grids for run_all.sh --grid (utils/run/grid.py describes the work dir layout).

    python scripts/grid.py plan --preset tiny [--set K=V ...] --grid monotone.construction=a,b [--grid ...]
        one line per variant, tab-separated: NAME, its baseline owner (- for the main run's baseline,
        else the variant that trains it), then its overrides K=V (exit 2 on a bad grid)
    python scripts/grid.py link --work-dir WORK --seeds 42,1337 [--baseline-from OWNER] NAME
        create the variant's run dir WORK/variants/NAME with its links to stage 0 and the baselines
"""
import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401

from configs.experiment_config import ConfigError
from configs.presets import parse_sets
from configs.presets import PRESETS
from utils.run.grid import MAIN, baseline_owners, link_variant, variants
from utils.run.run_files import PipelineError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan")
    plan.add_argument("--preset", default="tiny", help=f"named preset: {', '.join(PRESETS)}")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2")
    link = sub.add_parser("link")
    link.add_argument("--work-dir", required=True, type=Path)
    link.add_argument("--seeds", required=True)
    link.add_argument("--baseline-from", default=MAIN, metavar="OWNER")
    link.add_argument("name")
    args = p.parse_args()
    try:
        if args.command == "plan":
            plan = variants(args.preset, parse_sets(args.overrides), args.grid)
            for (name, pairs), owner in zip(plan, baseline_owners(plan)):
                print("\t".join([name, owner, *(f"{k}={v}" for k, v in pairs)]))
        else:
            link_variant(args.work_dir, args.name, [int(s) for s in args.seeds.split(",")], args.baseline_from)
    except (ConfigError, PipelineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
