#!/usr/bin/env python
"""Peak GPU memory of a preset's training step, simulated on this machine (no GPU needed).

    python benchmarks/estimate_memory.py --preset pythia-1.4b --gpus 1,8 [--micro-batch 8,4,2,1] [--json out.json]

For each number of GPUs and micro-batch (default: the preset's, then halvings until one fits
a 40 GB GPU; grad_accum_steps stays the preset's), runs the real training step of the monotone arm (or
--arm baseline) under FakeTensorMode with a fake process group, FSDP2 sharding as training does
it, and torch's FSDPMemTracker (utils/train/memory.py says how and what it cannot see). Prints
the peak per GPU by category, and whether it fits a 40 GB and an 80 GB GPU with the stated reserve.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402,F401
from configs.presets import parse_sets  # noqa: E402
from configs.presets import PRESETS, load_config  # noqa: E402
from utils.train.memory import GIB, RESERVE_GIB, USABLE, estimate, fits  # noqa: E402

CAPACITIES = (("A100-40GB", 40), ("A100/H100-80GB", 80))
SHOWN = ("param", "sharded_param", "unsharded_param", "grad", "sharded_grad", "unsharded_grad", "opt", "act", "temp",
         "all_gather", "reduce_scatter")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", required=True, choices=list(PRESETS))
    ap.add_argument("--gpus", default="1", help="comma-separated GPU counts")
    ap.add_argument("--micro-batch", default="",
                    help="comma-separated; default the preset's, then halvings while it does not fit 40 GB")
    ap.add_argument("--arm", default="monotonic", choices=("monotonic", "baseline"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = load_config(args.preset, parse_sets(args.overrides))
    recipe = cfg.recovery_baseline if args.arm == "baseline" else cfg.recovery_monotone
    sizes = [int(x) for x in args.micro_batch.split(",")] if args.micro_batch else \
        [recipe.micro_batch_size >> i for i in range(recipe.micro_batch_size.bit_length())]
    print(f"{args.preset}, {args.arm} arm, seq {cfg.data.seq_len}, grad_accum_steps {recipe.grad_accum_steps}, "
          f"gradient checkpointing {'on' if recipe.gradient_checkpointing else 'off'}, bf16-mixed; fits = peak + "
          f"{RESERVE_GIB:g} GiB (CUDA context, workspaces) <= {USABLE:.0%} of the GPU (fragmentation)")
    rows = []
    for gpus in (int(g) for g in args.gpus.split(",")):
        for mb in sizes:
            if mb * recipe.grad_accum_steps % gpus:
                continue
            if not args.micro_batch and any(r["gpus"] == gpus and all(r["fits"].values()) for r in rows):
                break                                   # a larger one fits every GPU already
            t0 = time.time()
            r = estimate(cfg, gpus, mb, args.arm)
            r["fits"] = {name: fits(r["peak_gib"], cap) for name, cap in CAPACITIES}
            rows.append(r)
            cats = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["peak_bytes"].items() if k in SHOWN and v >= GIB / 100)
            print(f"  {gpus} GPU(s), micro-batch {mb}: peak {r['peak_gib']:6.2f} GiB per GPU ({cats}); "
                  + ", ".join(f"{name} {'fits' if ok else 'does not fit'}" for name, ok in r["fits"].items())
                  + f"  [{time.time() - t0:.0f} s]")
        for name, _ in CAPACITIES:
            ok = [r["micro_batch"] for r in rows if r["gpus"] == gpus and r["fits"][name]]
            print(f"  {gpus} GPU(s), {name}: largest micro-batch that fits: {max(ok) if ok else 'none tried'}")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "arm": args.arm, "estimates": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
