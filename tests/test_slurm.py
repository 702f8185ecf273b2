"""The SLURM path on a real single-node cluster (scripts/slurm_local_cluster.sh).

In CI these run (the cluster is started as root); elsewhere they are skipped
when no cluster can be started, and they fail instead when CI=true.
"""
import os
import shutil
import signal  # noqa: F401
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, ROOT
from utils.train.checkpoint import read_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

LOCAL_RESOURCES = {"MONO_SLURM_GPU": "", "MONO_SLURM_CPUS": "1", "MONO_SLURM_MEM": "3G",
                   "MONO_SLURM_CPU_MEM": "3G"}
# What is under test is the job graph, not the measurements: lean stages 4-6 (GCG and lm-eval tasks run
# end to end in test_stages).
SMALL = FAST + [("eval.tasks", ""), ("attack.text_attacks", "hotflip"),
                ("attack.uat_opt_texts", "6"), ("attack.uat_eval_texts", "8"), ("attack.uat_restarts", "1"),
                ("attack.uat_max_sweeps", "2"), ("attack.hotflip_texts", "10"), ("attack.hotflip_max_flips", "3")]


def _sets(pairs):
    return [a for k, v in pairs for a in ("--set", f"{k}={v}")]


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return r.returncode == 0 and any(s in r.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not _cluster_up():
        if os.geteuid() == 0:
            subprocess.run(["bash", str(ROOT / "scripts" / "slurm_local_cluster.sh"), "start"], check=True, timeout=600)
        elif os.environ.get("CI"):
            pytest.fail("no SLURM cluster and not root: CI must run the SLURM tests")
        else:
            pytest.skip("no SLURM cluster here (start one as root: bash scripts/slurm_local_cluster.sh start)")
    assert _cluster_up()


def _env():
    return {**os.environ, **LOCAL_RESOURCES}


def _run_all(work, *args):
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), "--work-dir", str(work), *args],
                          capture_output=True, text=True, env=_env(), timeout=600)


def _job_ids(work):
    return [line.split("\t")[0] for line in (work / "slurm" / "jobs.tsv").read_text().splitlines()[1:]]


def _wait_until_no_jobs(ids, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(3)
    raise AssertionError(f"jobs still queued after {timeout}s:\n" + subprocess.run(["squeue"], capture_output=True,
                                                                                   text=True).stdout)


def _start_requeued_job_now(job, timeout=300):
    """SLURM holds a requeued job for about two minutes (its BeginTime) before it may start again;
    a cluster waits that out, the test need not: once the job is pending after its requeue, start it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        if "Restarts=0" not in state and "JobState=PENDING" in state:
            # slurmd revoked the first run's credential when it killed it, and refuses a credential made in
            # the same second ("Job credential revoked"): start the job again only once a second has passed.
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            return
        if "Restarts=0" not in state and "JobState=REQUEUED" not in state:
            return                                            # already running again, or done
        time.sleep(0.5)
    raise AssertionError(f"job {job} was not requeued within {timeout}s")


def _status(work):
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), "--status", "--work-dir", str(work)],
                          capture_output=True, text=True)


def test_two_seed_grid_completes_through_the_dependency_chain(tiny_run, tmp_path):
    """Two seeds of a one-variant ablation grid, submitted after stage 0 ran elsewhere (as on a login
    node): each seed's baseline in the work dir, the variant's stages 1 and 3-7 in variants/<name>/
    waiting on them, the comparison last. (A stage 0 job's dependents: the failure test below.)"""
    work = tmp_path / "work"
    shutil.copytree(tiny_run[1].shared, work / "shared")
    grid = ("--grid", "monotone.construction=projected")
    r = _run_all(work, "--seeds", "42,7", *_sets(SMALL), *grid)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "skip: stage_0_setup already done" in r.stderr, r.stderr
    variant = work / "variants" / "construction=projected"
    ids = _job_ids(work) + _job_ids(variant)
    assert len(_job_ids(work)) == 2 + 1 and len(_job_ids(variant)) == 2 * 5 + 1
    _wait_until_no_jobs(ids, timeout=1500)
    st = _status(work)
    assert st.returncode == 0, st.stdout + st.stderr
    assert st.stdout.count(" done") == len(ids) and "variant construction=projected:" in st.stdout
    final = __import__("json").loads((variant / "final" / "final_results.json").read_text())
    assert final["seeds"] == [42, 7] and not final["partial"]
    assert set(final["per_seed"]) == {"42", "7"}
    assert all(s["certificates"]["monotonic"]["monotone"] for s in final["per_seed"].values())
    logs = [log for w in (work, variant) for log in (w / "slurm" / "logs").glob("stage_[1-7]_*.log")]
    assert any(log.name.startswith("stage_4_") for log in logs)          # every job after stage 0: the hub off
    assert all("[job] hub offline (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1)" in log.read_text() for log in logs)
    comparison = __import__("json").loads((work / "final" / "comparison.json").read_text())
    assert [v["name"] for v in comparison["variants"]] == ["construction=projected"]
    # A rerun resumes a finished grid: every stage is skipped but the aggregate and the comparison.
    r = _run_all(work, "--seeds", "42,7", *_sets(SMALL), *grid)
    assert r.returncode == 0 and r.stderr.count("skip: ") == 1 + 2 + 2 * 5, r.stderr


def test_failed_stage_leaves_dependents_unrun_and_is_reported(tmp_path):
    work = tmp_path / "work"
    missing = tmp_path / "no_such_file.jsonl"
    bad = [("data.source", "jsonl")] + [(f"data.{s}_file", str(missing)) for s in ("train", "val", "test")]
    r = _run_all(work, "--seeds", "42", *_sets(SMALL + bad))
    assert r.returncode == 0, r.stderr
    ids = _job_ids(work)
    _wait_until_no_jobs(ids, timeout=300)
    st = _status(work)
    assert st.returncode == 1
    assert "FAILED: stage_0_setup" in st.stdout and "stage_0_setup_" in st.stdout and ".log" in st.stdout
    assert st.stdout.count("did not run") == len(ids) - 1
    log = next((work / "slurm" / "logs").glob("stage_0_setup_*.log")).read_text()
    assert "data file not found" in log
    assert not (work / "seed_42" / "results").exists()


def test_rejected_submission_cancels_the_jobs_already_submitted(tmp_path):
    # This cluster has no GPUs: forcing a gres makes sbatch reject stage 1 after
    # stage 0 (CPU only, no gres) was accepted.
    work = tmp_path / "work"
    r = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--work-dir", str(work), *_sets(FAST)],
                       capture_output=True, text=True, env={**_env(), "MONO_SLURM_GPU": "gpu:1"}, timeout=600)
    assert r.returncode == 1, r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "stage_1_apply_monotonicity (seed 42)" in errors[0] and "sbatch: error:" in errors[0], errors[0]
    assert "gres" in errors[0].lower(), errors[0]                 # sbatch's own reason
    ids = _job_ids(work)
    assert len(ids) == 1                                           # stage 0 only; nothing after stage 1
    assert f"cancelled the 1 job(s) of this run already submitted: {ids[0]}" in r.stderr, r.stderr
    _wait_until_no_jobs(ids, timeout=60)
    state = subprocess.run(["scontrol", "-o", "show", "job", ids[0]], capture_output=True, text=True).stdout
    assert "JobState=CANCELLED" in state, state
    assert not (work / "slurm" / ".submit_error").exists()


class _StartRequeuedJobs(threading.Thread):
    """What _start_requeued_job_now does, for every job of a run while it goes on."""

    def __init__(self, work):
        super().__init__(daemon=True)
        self.work, self.done, self.started = work, threading.Event(), set()

    def run(self):
        while not self.done.is_set():
            tsv = self.work / "slurm" / "jobs.tsv"
            for job in _job_ids(self.work) if tsv.exists() else []:
                state = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
                restarts = state.split("Restarts=")[1].split()[0] if "Restarts=" in state else "0"
                if restarts != "0" and "JobState=PENDING" in state and (job, restarts) not in self.started:
                    time.sleep(2)                    # see _start_requeued_job_now: not in the second it was killed
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
                    self.started.add((job, restarts))
            time.sleep(1)


def test_the_chain_finishes_under_a_short_partition_limit_requeued_each_time_it_expires(tiny_run, tmp_path):
    """The partition's MaxTime lowered to 2 minutes: run_all.sh reads it and no job asks for more. Stage 2 (a
    recipe search) and stage 6 have more work than one job holds: SLURM's own warning 60 s before the real
    limit stops each (exit 75), the job is requeued and goes on where it stopped, and the afterok chain
    completes. Every record and the baseline's weights equal an uninterrupted run's with the same thread count."""
    _, paths = tiny_run
    sets = _sets(SMALL + [("recovery_baseline.max_tokens", "200000"), ("recovery_baseline.lr_grid", "1e-3,3e-3"),
                          ("recovery_baseline.sweep_tokens", "80000"), ("recovery_baseline.lr_confirm", "2"),
                          ("attack.text_attacks", "hotflip,random_search")])
    reference, work = tmp_path / "reference", tmp_path / "work"
    for w in (reference, work):
        shutil.copytree(paths.shared, w / "shared")
    # The uninterrupted run, beside the cluster's: the same thread count as the 1-CPU jobs (float reductions
    # depend on it), one process per stage.
    uninterrupted = subprocess.Popen(["bash", str(ROOT / "run_all.sh"), "--local", "--work-dir", str(reference), *sets],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", "MONO_LOCAL_PROCS": "1"})
    part = subprocess.run(["scontrol", "-o", "show", "partition", "local"], capture_output=True, text=True).stdout
    before = part.split("MaxTime=")[1].split()[0]
    subprocess.run(["scontrol", "update", "PartitionName=local", "MaxTime=2"], check=True)
    starter = _StartRequeuedJobs(work)
    try:
        r = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--work-dir", str(work), *sets], capture_output=True,
                           text=True, timeout=600, env={**_env(), "MONO_SLURM_SIGNAL_LEAD": "60",
                                                        # the counted work is an upper bound far above the tiny
                                                        # chain's (stage 4 assumes 1,600-token documents): a stated
                                                        # rate keeps each arm's counted piece inside a 2-min job
                                                        "MONO_SLURM_TFLOPS": "1"})
        assert r.returncode == 0, r.stderr + r.stdout
        ids = _job_ids(work)
        limits = [subprocess.run(["scontrol", "-o", "show", "job", j], capture_output=True, text=True).stdout
                  .split("TimeLimit=")[1].split()[0] for j in ids]
        assert limits and all(lim in ("00:01:00", "00:02:00") for lim in limits), limits
        starter.start()
        _wait_until_no_jobs(ids, timeout=1500)
        out, _ = uninterrupted.communicate(timeout=1200)
        assert uninterrupted.returncode == 0, out[-3000:]
    finally:
        starter.done.set()
        uninterrupted.kill()
        subprocess.run(["scontrol", "update", "PartitionName=local", f"MaxTime={before}"], check=True)
    st = _status(work)
    assert st.returncode == 0 and st.stdout.count(" done") == len(ids), st.stdout + st.stderr
    logs = {p.name.split("_seed")[0]: p.read_text() for p in (work / "slurm" / "logs").glob("stage_*_seed42_*.log")}
    for stage in ("stage_2_train_baseline", "stage_6_hotflip_attacks"):
        assert "requeueing job" in logs[stage] and "restart=1" in logs[stage], logs[stage][-3000:]
    assert "lr sweep" in logs["stage_2_train_baseline"]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_records.py"), str(reference / "seed_42"),
                        str(work / "seed_42"), "--tolerance", "1e-6"], capture_output=True, text=True)
    assert r.returncode == 0 and "hotflip: 0 difference(s)" in r.stdout, r.stdout
    a, b = (load_file(str(w / "seed_42" / "models" / "baseline" / "model.safetensors")) for w in (reference, work))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_training_job_requeues_on_usr1_and_matches_torchrun(tiny_run, tmp_path):
    """srun + torchrun with 2 CPU ranks (gloo) inside a SLURM job: preempted, requeued, resumed."""
    _, paths = tiny_run
    short = [("recovery_baseline.max_tokens", "24576"), ("recovery_baseline.micro_batch_size", "8"),
             ("recovery_baseline.checkpoint_every_steps", "3"), ("recovery_baseline.eval_windows", "8")]
    sets = _sets(FAST + short)
    reference = tmp_path / "reference"
    shutil.copytree(paths.shared, reference / "shared")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "scripts" / "stage_2_train_baseline.py"), "--work-dir", str(reference), *sets],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    work = tmp_path / "work"
    shutil.copytree(paths.shared, work / "shared")
    log = work / "job.log"
    job = subprocess.run(
        ["sbatch", "--parsable", "--job-name", "mono-2proc", "--output", str(log), "--mem", "4G",
         "--cpus-per-task", "2", "--nodes", "1", "--ntasks-per-node", "1", "--export", "ALL,MONO_NPROC_PER_NODE=2",
         "--signal", "B:USR1@60", "--requeue", "--open-mode=append",
         str(ROOT / "jobs" / "job_2_baseline.sh"), str(ROOT), "tiny", "42", str(work), *sets],
        capture_output=True, text=True, env=_env(), check=True).stdout.strip()
    ckpts = work / "seed_42" / "checkpoints" / "baseline"
    deadline = time.time() + 300
    while not list(ckpts.glob("step_*")):
        assert time.time() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    _start_requeued_job_now(job)
    _wait_until_no_jobs([job], timeout=900)
    text = log.read_text()
    assert "1 node(s) x 2 process(es)" in text and "2 process(es)" in text, text[-3000:]
    assert "requeueing job" in text and "restart=1" in text and "resumed from" in text, text[-3000:]
    assert (work / "seed_42" / "flags" / "stage_2_train_baseline.done").exists()
    final = "step_00000024"
    a = read_checkpoint(work / "seed_42" / "checkpoints" / "baseline" / final)
    b = read_checkpoint(reference / "seed_42" / "checkpoints" / "baseline" / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
