#!/usr/bin/env python3
"""Print one field of the resolved config: preset, then MONO__* environment, then --set.

    python scripts/config_value.py --preset pythia-410m --set device=cpu device      # -> cpu
    python scripts/config_value.py --preset tiny data.seq_len

run_all.sh uses it to decide whether the SLURM jobs ask for a GPU. Exit 2 on an
unknown preset, override or key. Imports only the config module (no torch).
"""
import argparse
import sys

import _bootstrap  # noqa: F401

from configs.experiment_config import ConfigError
from configs.presets import parse_sets
from configs.presets import PRESETS, load_config


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help=f"named preset: {', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("key", help="field to print, e.g. device or data.seq_len")
    args = p.parse_args()
    try:
        value = load_config(args.preset, parse_sets(args.overrides))
        for part in args.key.split("."):
            if not hasattr(value, "__dataclass_fields__") or part not in value.__dataclass_fields__:
                raise ConfigError(f"unknown config key {args.key!r}")
            value = getattr(value, part)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
