#!/usr/bin/env python3
"""Print the SLURM time limit and --mem of every job (stages 0-8, 9: the attack pilot): limits of stages 2-6 derived from the counted
work, host memory from the counted model state (utils/run/resources.py).

    python scripts/time_limits.py --preset pythia-1.4b --gpu 1            # -> "0 01:00:00 16G" ... one per stage
    python scripts/time_limits.py --preset pythia-6.9b --gpu 1 --explain  # and how, on stderr

run_all.sh uses it for every submission (MONO_SLURM_TIME_<N> still wins) and prints the explanation with
--dry-run. No limit exceeds the cluster's own (MONO_SLURM_MAX_TIME, else the MaxTime of the partition
MONO_SLURM_PARTITION or the default one, and the MaxWall of the QOS MONO_SLURM_QOS). A model of unknown size
(a hub id that is not a Pythia) gets the fixed limits. Exit 2 on a config error or a stage that cannot fit
the cluster's limit even in requeued jobs (one line).
"""
import argparse
import os
import sys

import _bootstrap  # noqa: F401

from configs.experiment_config import ConfigError
from configs.presets import parse_sets
from configs.presets import PRESETS, load_config
from utils.run.pilot_grid import PILOT_TEXTS
from utils.run import resources
from utils.run.time_limits import (LimitError, cluster_max_hours, describe, describe_cap, hms, job_limits,
                                   slurm_hours)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help=f"named preset: {', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpu", type=int, choices=(0, 1), required=True, help="1: the jobs get a GPU")
    p.add_argument("--train-procs", type=int, default=1, help="processes of a training job (stages 2-3), all nodes")
    p.add_argument("--train-nodes", type=int, default=1, help="nodes of a training job")
    p.add_argument("--measure-procs", type=int, default=1, help="processes of a measurement job (stages 4-6)")
    p.add_argument("--pilot-texts", type=int, default=PILOT_TEXTS, help="the attack pilot's texts per arm (job 9)")
    p.add_argument("--explain", action="store_true", help="also print the counted work and assumptions (stderr)")
    args = p.parse_args()
    try:
        cfg = load_config(args.preset, parse_sets(args.overrides))
        max_hours, source = cluster_max_hours(os.environ.get("MONO_SLURM_PARTITION", ""),
                                              os.environ.get("MONO_SLURM_QOS", ""))
        stated = {n: slurm_hours(os.environ[f"MONO_SLURM_TIME_{n}"]) for n in range(10)
                  if os.environ.get(f"MONO_SLURM_TIME_{n}")}
        hours, limits = job_limits(cfg, bool(args.gpu), args.train_procs, args.measure_procs, max_hours,
                                   float(os.environ.get("MONO_SLURM_SIGNAL_LEAD", "120")), stated, args.pilot_texts)
    except (ConfigError, LimitError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpu, per_node = bool(args.gpu), args.train_procs // args.train_nodes
    shape = {2: (per_node, args.train_procs), 3: (per_node, args.train_procs),
             **{s: (args.measure_procs, args.measure_procs) for s in (4, 5, 6, 9)}}
    mems = {s: resources.host_memory_gib(cfg, s, gpu, *shape.get(s, (1, 1))) for s in hours}
    requests = {s: resources.mem_request(g, "16G" if s in (0, 7, 8) else "64G") for s, g in mems.items()}
    for stage, h in hours.items():
        print(stage, hms(h), requests[stage])
    if args.explain:
        print(describe_cap(max_hours, source), file=sys.stderr)
        print("\n".join(resources.describe(cfg, mems, requests)), file=sys.stderr)
        print("\n".join(describe(cfg, limits, bool(args.gpu), args.train_procs, args.measure_procs) if limits else
                        ["time limits: the model's size is unknown before stage 0; the fixed limits apply"]),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
