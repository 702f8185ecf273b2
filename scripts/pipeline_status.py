#!/usr/bin/env python3
"""Status of a work dir: every stage and seed that run_all.sh ever ran or submitted there (SLURM or
--local), the latest run of each, one line each, failures with logs.

    python scripts/pipeline_status.py WORK_DIR      (or: bash run_all.sh --status --work-dir WORK_DIR)

Reads WORK_DIR/{slurm,local}/history.tsv (every invocation appends its jobs; a work dir of an older
version has only jobs.tsv, its latest invocation) and the status files the stages write; asks squeue
about SLURM jobs still queued. A finished stage whose outputs are no longer whole is reported.
Exit 1 if any stage failed or never ran because a stage it depends on failed. Standard library only.
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


SHARED = ("stage_0_setup", "stage_7_aggregate", "compare_variants")     # once per work dir, not per seed


def recorded_jobs(work: Path) -> list[tuple[Path, list[str]]]:
    """The latest (record dir, [job_id, stage, seed, log]) of every stage and seed, in stage order."""
    latest = {}
    for record in (work / "slurm", work / "local"):
        tsv = record / "history.tsv" if (record / "history.tsv").exists() else record / "jobs.tsv"
        if not tsv.exists():
            continue
        for line in tsv.read_text().splitlines()[1:]:
            cols = line.split("\t")
            if len(cols) < 4:
                continue
            when = float(cols[4]) if len(cols) > 4 else tsv.stat().st_mtime
            key = (cols[1], "-" if cols[1] in SHARED else cols[2])
            if key not in latest or when >= latest[key][0]:
                latest[key] = (when, record, cols[:4])
    def order(key):   # stage 0 to 7 (each stage's seeds in order; the attack pilot after stage 1), the comparison last
        stage, seed = key
        return stage == "compare_variants", "stage_1~" if stage == "attack_pilot" else stage, -1 if seed == "-" else int(seed)
    return [latest[k][1:] for k in sorted(latest, key=order)]


def main(work_dir: str) -> int:
    work = Path(work_dir)
    rows = recorded_jobs(work)
    if not rows:
        print(f"error: no run recorded in {work} (neither slurm/ nor local/ holds a jobs record)", file=sys.stderr)
        return 2
    print(f"every stage and seed recorded in {work} (the latest run of each)")
    bad = []
    print(f"{'job':>8}  {'stage':<28}{'seed':>6}  state")
    for record, (job_id, stage, seed, log) in rows:
        seed = "-" if stage in SHARED else seed
        tag = stage if stage in SHARED else f"{stage}_seed{seed}"
        status_file = record / "status" / tag
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
            broken = broken_output(work, stage, seed) if recorded[0] == "done" else None
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
