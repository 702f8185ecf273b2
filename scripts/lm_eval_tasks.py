#!/usr/bin/env python
"""Write lm-eval task configs for the offline held-out tasks stage 0 built (heldout_lastword,
heldout_cloze), so the lm_eval command line runs them without the hub:

    python scripts/lm_eval_tasks.py --work-dir work --out work/lm_eval_tasks
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf \
        --model_args pretrained=work/seed_42/models/monotonic,trust_remote_code=True,dtype=float32 \
        --include_path work/lm_eval_tasks --tasks heldout_cloze,heldout_lastword --batch_size 8

The configs name the task data in WORK_DIR/shared/tasks by absolute path: after moving a work dir,
write them again.
"""
import _bootstrap  # noqa: F401

import argparse
import sys
from pathlib import Path

from utils.measure.capabilities import write_task_configs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", required=True, help="a work dir where stage 0 ran")
    p.add_argument("--out", required=True, help="the folder to write the task configs to (lm_eval --include_path)")
    args = p.parse_args()
    data = Path(args.work_dir) / "shared" / "tasks"
    if not list(data.glob("heldout_*.jsonl")):
        print(f"error: no held-out task data in {data}: stage 0 builds it when eval.tasks names "
              f"heldout_lastword or heldout_cloze (the tiny preset's default)", file=sys.stderr)
        return 1
    written = write_task_configs(data, Path(args.out))
    print(f"wrote {', '.join(p.name for p in written)} to {args.out}; run lm_eval with --include_path {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
