#!/usr/bin/env python3
"""Status of a SLURM submission of run_all.sh: one line per job, failures with their logs.

    python scripts/pipeline_status.py WORK_DIR      (or: bash run_all.sh --status --work-dir WORK_DIR)

Reads WORK_DIR/slurm/jobs.tsv (written at submission) and the status files the
jobs write; asks squeue about jobs still queued. Exit 1 if any stage failed or
never ran because a stage it depends on failed. Standard library only.
"""
import subprocess
import sys
from pathlib import Path


def queue_state(job_id: str) -> str | None:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True,
                             timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def main(work_dir: str) -> int:
    work = Path(work_dir)
    tsv = work / "slurm" / "jobs.tsv"
    if not tsv.exists():
        print(f"error: no SLURM submission recorded in {work} (missing {tsv})", file=sys.stderr)
        return 2
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
    bad = []
    print(f"{'job':>8}  {'stage':<28}{'seed':>6}  state")
    for job_id, stage, seed, log in rows:
        tag = stage if stage in ("stage_0_setup", "stage_7_aggregate") else f"{stage}_seed{seed}"
        status_file = work / "slurm" / "status" / tag
        recorded = status_file.read_text().split() if status_file.exists() else []
        queued = queue_state(job_id)
        if recorded and recorded[1] != job_id:
            recorded = []                       # an older submission's record
        if queued:
            state = queued.split("|")[0].lower()
            reason = queued.split("|")[1]
            if "DependencyNeverSatisfied" in reason:
                state = "never runs: a dependency failed"
                bad.append((stage, seed, "", state))
            elif reason not in ("None", ""):
                state += f" ({reason})"
        elif recorded:
            state = recorded[0] + (" " + " ".join(recorded[2:]) if len(recorded) > 2 else "")
            if recorded[0] == "failed":
                bad.append((stage, seed, log, state))
        else:
            state = "did not run (cancelled: a dependency failed)"
            bad.append((stage, seed, "", state))
        print(f"{job_id:>8}  {stage:<28}{seed:>6}  {state}" + (f"  log: {log}" if recorded and recorded[0] == "failed" else ""))
    failed = [b for b in bad if b[2]]
    for stage, seed, log, state in failed:
        print(f"FAILED: {stage} (seed {seed}); log: {log}")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1]))
