#!/usr/bin/env python
"""The attack pilot: the budgets at which stage 6's searches plateau, on the arms stages 0-1 built (the
pretrained model, monotonic_init, the first control), before any training (utils/attack_pilot.py says what it
sweeps). Writes results/attack_pilot.{json,md,png} and prints the recommended budgets as --set lines.

    python scripts/attack_pilot.py --preset tiny --work-dir W [--texts 8] [--set ...]
    torchrun --nproc_per_node 8 scripts/attack_pilot.py --preset pythia-1.4b --work-dir W   # texts shared out
"""
import _bootstrap  # noqa: F401

import sys
from pathlib import Path

from configs.experiment_config import ConfigError
from utils.attack_pilot import run_pilot, set_lines, write_outputs
from utils.run import distributed
from utils.run.cli import EXIT_CONFIG, config_from_args, one_line_on_failure, stage_parser
from utils.run.pilot_grid import PILOT_TEXTS
from utils.run.run_files import RunPaths


def main() -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--texts", type=int, default=PILOT_TEXTS,
                        help=f"attacked texts per arm (the seed's first; default {PILOT_TEXTS})")
    args = parser.parse_args()
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.texts < 1:
        print("error: --texts must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    if args.check or args.force:
        print("error: --check and --force are a stage's; the pilot keeps no completion flag and always runs",
              file=sys.stderr)
        return EXIT_CONFIG
    paths = RunPaths(Path(cfg.work_dir), cfg.seed)

    def pilot():
        if distributed.launched():
            distributed.init(cfg.device)
        out = run_pilot(cfg, paths, args.texts)
        if distributed.is_main():
            written = write_outputs(out, paths.results)
            print((paths.results / "attack_pilot.md").read_text(), end="")
            print("recommended: " + (" ".join(set_lines(out["recommended"])) or "none (no measured budget plateaued)"))
            print("wrote " + ", ".join(written))
    try:
        return one_line_on_failure("attack_pilot", pilot)
    finally:
        distributed.destroy()


if __name__ == "__main__":
    raise SystemExit(main())
