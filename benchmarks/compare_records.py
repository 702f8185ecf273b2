#!/usr/bin/env python
"""Do two runs of one seed hold the same measurements? For checking that a speed change measured nothing new.

    python benchmarks/compare_records.py OLD_SEED_DIR NEW_SEED_DIR [--tolerance 1e-4]

Compares stages 4-6's result files (evaluation, uat, hotflip, gcg, gcg_surrogate, random_search, pgd) field
by field: every record, token id, flag and count must be equal and every float within the tolerance. Wall
clock, paths, process counts and cost counters (what a speed change is meant to change) are not compared;
fields present in one run only are listed. Exit 1 on any difference.
"""
import argparse
import json
import math
import sys
from pathlib import Path

FILES = ("evaluation", "uat", "hotflip", "gcg", "gcg_surrogate", "random_search", "pgd")
NOT_COMPARED = {"seconds", "seconds_per_example", "search_seconds", "processes", "compute", "path", "token_file",
                "deltas_file", "cost", "search_cost", "transfer_cost"}


def differences(a, b, where: str, tol: float, out: list, largest: list) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in NOT_COMPARED:
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: in one run only")
            else:
                differences(a[k], b[k], f"{where}.{k}", tol, out, largest)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b)):
            differences(x, y, f"{where}[{i}]", tol, out, largest)
    elif isinstance(a, float) and isinstance(b, float) and not (math.isnan(a) and math.isnan(b)):
        largest[0] = max(largest[0], abs(a - b))
        if not abs(a - b) <= tol:
            out.append(f"{where}: {a!r} vs {b!r}")
    elif a != b and not (isinstance(a, float) and isinstance(b, float)):
        out.append(f"{where}: {str(a)[:60]} vs {str(b)[:60]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path, help="a seed_<S> directory (or its results/)")
    p.add_argument("new", type=Path)
    p.add_argument("--tolerance", type=float, default=1e-4)
    args = p.parse_args()
    dirs = [d / "results" if (d / "results").is_dir() else d for d in (args.old, args.new)]
    found, largest = [], [0.0]
    for name in FILES:
        paths = [d / f"{name}.json" for d in dirs]
        if not all(q.is_file() for q in paths):
            print(f"{name}: not in both runs, skipped")
            continue
        diffs = []
        differences(*(json.loads(q.read_text()) for q in paths), name, args.tolerance, diffs, largest)
        print(f"{name}: {len(diffs)} difference(s)")
        found += diffs
    print(f"largest float difference {largest[0]:.3g} (tolerance {args.tolerance:g})")
    print("\n".join(found[:40]))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
