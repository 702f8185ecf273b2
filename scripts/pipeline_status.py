#!/usr/bin/env python3
"""Status of the latest run_all.sh run of a work dir (SLURM or --local): one line per stage, failures with logs.

    python scripts/pipeline_status.py WORK_DIR      (or: bash run_all.sh --status --work-dir WORK_DIR)

Reads WORK_DIR/slurm/jobs.tsv (written at submission) or WORK_DIR/local/jobs.tsv
(a local run), whichever is newer, and the status files the stages write; asks
squeue about SLURM jobs still queued. Exit 1 if any stage failed or never ran
because a stage it depends on failed. Standard library only.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_files():
    """utils/run/run_files.py (standard library only), loaded without the `utils` package, whose
    import pulls in transformers: the status stays quick."""
    spec = importlib.util.spec_from_file_location("run_files", ROOT / "utils" / "run" / "run_files.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def broken_output(work: Path, stage: str, seed: str) -> str | None:
    """The first output a finished stage's completion flag lists that is no longer whole, or None."""
    flag = (work / "shared" if stage == "stage_0_setup" else work / f"seed_{seed}") / "flags" / f"{stage}.done"
    if stage in ("stage_7_aggregate", "compare_variants") or not flag.exists():
        return None
    try:
        outputs = json.loads(flag.read_text()).get("outputs", [])
    except json.JSONDecodeError:
        return f"its completion flag {flag} is corrupt"
    check = _run_files().output_problem
    for recorded in outputs:
        problem = check(work / recorded)
        if problem:
            return f"{recorded} is not whole ({problem})"
    return None


def queue_state(job_id: str) -> str | None:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True,
                             timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def main(work_dir: str) -> int:
    work = Path(work_dir)
    runs = [p for p in (work / "slurm" / "jobs.tsv", work / "local" / "jobs.tsv") if p.exists()]
    if not runs:
        print(f"error: no run recorded in {work} (neither slurm/jobs.tsv nor local/jobs.tsv)", file=sys.stderr)
        return 2
    tsv = max(runs, key=lambda p: p.stat().st_mtime)
    print(f"{'local run' if tsv.parent.name == 'local' else 'SLURM submission'} recorded in {tsv}")
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
    bad = []
    print(f"{'job':>8}  {'stage':<28}{'seed':>6}  state")
    for job_id, stage, seed, log in rows:
        tag = stage if stage in ("stage_0_setup", "stage_7_aggregate", "compare_variants") else f"{stage}_seed{seed}"
        status_file = tsv.parent / "status" / tag
        recorded = status_file.read_text().split() if status_file.exists() else []
        queued = queue_state(job_id) if job_id != "local" else None
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
            if recorded[0] in ("failed", "interrupted"):
                bad.append((stage, seed, log, state))
            broken = broken_output(tsv.parent.parent, stage, seed) if recorded[0] == "done" else None
            if broken:
                state = f"done, but {broken}: rerun the same command to redo it"
                bad.append((stage, seed, "", state))
        else:
            state = "did not run (cancelled: a dependency failed)"
            bad.append((stage, seed, "", state))
        print(f"{job_id:>8}  {stage:<28}{seed:>6}  {state}" + (f"  log: {log}" if recorded and recorded[0] in
                                                                 ("failed", "interrupted") else ""))
    failed = [b for b in bad if b[2]]
    for stage, seed, log, state in failed:
        print(f"{state.split()[0].upper()}: {stage} (seed {seed}); log: {log}")
    return 1 if bad else 0


def main_with_variants(work_dir: str) -> int:
    """The work dir's own run, then each ablation variant's (run_all.sh --grid) under variants/."""
    rc = main(work_dir)
    for variant in sorted(p for p in (Path(work_dir) / "variants").glob("*") if p.is_dir()):
        print(f"\nvariant {variant.name}:")
        rc = max(rc, main(str(variant)))
    return rc


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main_with_variants(sys.argv[1]))
