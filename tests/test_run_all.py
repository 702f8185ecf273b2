"""run_all.sh: argument errors, and the sbatch commands it would submit (golden file)."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

GOLDEN = ROOT / "tests" / "golden" / "run_all_dry_run.txt"


def _run_all(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONO_SLURM_")}
    env["MONO_SLURM_MAX_TIME"] = "UNLIMITED"       # not this machine's test cluster, whatever its partition says
    env.update(env_extra or {})
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_dry_run_matches_the_golden_sbatch_commands(tmp_path):
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), "--seeds", "42,7", "--set", "data.seq_len=64")
    assert r.returncode == 0, r.stderr
    lines = [l.replace(str(ROOT), "<ROOT>").replace(str(tmp_path), "<WORK>")
             for l in r.stdout.splitlines() if l.startswith("sbatch ")]
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text("\n".join(lines) + "\n")
    assert lines == GOLDEN.read_text().splitlines()
    assert all(l.startswith("sbatch ") for l in r.stdout.splitlines())   # stdout: the commands alone
    assert not (tmp_path / "slurm").exists()                             # nothing submitted or created


def test_site_settings_reach_sbatch(tmp_path):
    r = _run_all("--dry-run", "--work-dir", str(tmp_path),
                 env_extra={"MONO_SLURM_PARTITION": "gpu-a100", "MONO_SLURM_ACCOUNT": "proj42",
                            "MONO_SLURM_GPU": "gpu:a100:1", "MONO_SLURM_TIME_2": "02:00:00"})
    train = next(l for l in r.stdout.splitlines() if "job_2_baseline.sh" in l)
    assert "--partition gpu-a100" in train and "--account proj42" in train
    assert "--gres gpu:a100:1" in train and "--time 02:00:00" in train
    setup = next(l for l in r.stdout.splitlines() if "job_0_setup.sh" in l)
    assert "--gres" not in setup                                   # CPU-only stage


@pytest.mark.parametrize("env_extra, args, train", [
    ({"MONO_SLURM_NODES": "2", "MONO_SLURM_GPUS_PER_NODE": "4"}, ("--preset", "pythia-1.4b"),
     "--nodes 2 --ntasks-per-node 1 --export ALL,MONO_NPROC_PER_NODE=4 --gres gpu:4 "),
    ({"MONO_SLURM_GPUS_PER_NODE": "8", "MONO_SLURM_GPU": "gpu:a100:1"}, ("--preset", "pythia-6.9b"),
     "--nodes 1 --ntasks-per-node 1 --export ALL,MONO_NPROC_PER_NODE=8 --gres gpu:a100:8 "),
    ({"MONO_SLURM_GPUS_PER_NODE": "2"}, (), "--nodes 1 --ntasks-per-node 1 --export ALL,MONO_NPROC_PER_NODE=2 "),
], ids=["2-nodes-x-4-gpus", "8-typed-gpus", "2-cpu-processes"])
def test_multi_process_training_jobs(tmp_path, env_extra, args, train):
    """Stages 2-3 become srun + torchrun jobs over the nodes; every other stage stays one process."""
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), *args, env_extra=env_extra)
    assert r.returncode == 0, r.stderr
    for line in (l for l in r.stdout.splitlines() if l.startswith("sbatch ")):
        stage = int(line.split("--job-name mono-")[1][0])
        if stage in (2, 3):
            assert train in line, line
        else:
            assert "--nodes" not in line and "MONO_NPROC_PER_NODE" not in line, line
            assert "gpu:4" not in line and "gpu:a100:8" not in line


@pytest.mark.parametrize("env_extra, measure", [
    ({"MONO_SLURM_MEASURE_PROCS": "4", "MONO_SLURM_GPU": "gpu:a100:1"},
     "--nodes 1 --ntasks-per-node 1 --export ALL,MONO_NPROC_PER_NODE=4 --gres gpu:a100:4 "),
    ({"MONO_SLURM_MEASURE_PROCS": "2", "MONO_SLURM_GPUS_PER_NODE": "8"},
     "--nodes 1 --ntasks-per-node 1 --export ALL,MONO_NPROC_PER_NODE=2 --gres gpu:2 "),
], ids=["4-typed-gpus", "2-gpus-beside-8-for-training"])
def test_sharded_measurement_jobs(tmp_path, env_extra, measure):
    """MONO_SLURM_MEASURE_PROCS makes stages 4-6 torchrun jobs of that many processes on one node."""
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), "--preset", "pythia-1.4b", env_extra=env_extra)
    assert r.returncode == 0, r.stderr
    for line in (l for l in r.stdout.splitlines() if l.startswith("sbatch ")):
        stage = int(line.split("--job-name mono-")[1][0])
        if stage in (4, 5, 6):      # they keep each arm they measured and requeue
            assert measure in line and "--signal B:USR1@120 --requeue" in line, line      # stages 4-6 requeue
        elif stage not in (2, 3):
            assert "--nodes" not in line and "MONO_NPROC_PER_NODE" not in line, line
    # --pilot: stages 0-1 of the first seed, then the attack pilot alone, sharded like stages 4-6, not requeued,
    # its limit and texts those scripts/time_limits.py counts.
    r = _run_all("--dry-run", "--pilot", "--pilot-texts", "4", "--work-dir", str(tmp_path), "--preset", "pythia-1.4b",
                 "--seeds", "42,7", env_extra={**env_extra, "MONO_SLURM_MAX_TIME": "UNLIMITED"})
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("sbatch ")]
    assert [l.split("--job-name ")[1].split()[0] for l in lines] == ["mono-0-s42", "mono-1-s42", "mono-9-s42"]
    procs = env_extra["MONO_SLURM_MEASURE_PROCS"]
    counted = subprocess.run([sys.executable, str(ROOT / "scripts" / "time_limits.py"), "--preset", "pythia-1.4b",
                              "--gpu", "1", "--measure-procs", procs, "--pilot-texts", "4"], capture_output=True, text=True,
                             env={**os.environ, "MONO_SLURM_MAX_TIME": "UNLIMITED"}).stdout
    limit = next(l.split()[1] for l in counted.splitlines() if l.startswith("9 "))
    assert measure in lines[2] and f"--time {limit} " in lines[2] and "--requeue" not in lines[2]
    assert lines[2].endswith("--texts 4") and "afterok:<job_1_s42>" in lines[2]
    assert "the attack pilot (run_all.sh --pilot" in r.stderr


@pytest.mark.parametrize("name, value", [("MONO_SLURM_NODES", "0"), ("MONO_SLURM_GPUS_PER_NODE", "two"),
                                         ("MONO_SLURM_MEASURE_PROCS", "-1")])
def test_bad_multi_process_settings_are_one_error_line(tmp_path, name, value):
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), env_extra={name: value})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and f"{name} must be a positive integer" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not r.stdout


@pytest.mark.parametrize("args, env_extra, gres", [
    ((), {}, None),                                                   # tiny: device=auto, no GPU asked
    (("--preset", "pythia-410m"), {}, "gpu:1"),                       # device=cuda
    (("--preset", "pythia-410m", "--set", "device=cpu"), {}, None),
    (("--preset", "pythia-410m"), {"MONO__DEVICE": "cpu"}, None),     # environment override
    (("--preset", "pythia-410m"), {"MONO_SLURM_GPU": ""}, None),      # empty: none, even for cuda
    ((), {"MONO_SLURM_GPU": "gpu:a100:1"}, "gpu:a100:1"),             # set: asked whatever the device
], ids=["tiny", "pythia-cuda", "pythia-set-cpu", "pythia-env-cpu", "pythia-gpu-empty", "tiny-gpu-forced"])
def test_gpu_is_requested_only_for_a_cuda_config_or_when_forced(tmp_path, args, env_extra, gres):
    # A stated throughput: a pythia config on CPUs would otherwise be refused by its counted work (a day per arm
    # of stage 4 at the assumed CPU rate; test_no_job_asks_for_more...), and the limits are not under test here.
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), *args, env_extra={"MONO_SLURM_TFLOPS": "1000", **env_extra})
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("sbatch ")]
    assert len(lines) == 8
    for line in lines:
        stage = int(line.split("--job-name mono-")[1][0])
        want = f"--gres {gres} " if gres and 1 <= stage <= 6 else None
        if want:
            assert line.count("--gres") == 1 and want in line, line
        else:
            assert "--gres" not in line, line


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
    for args, msg in ((("--seeds", "4x"), "--seeds must be"), (("--bogus",), "unknown argument"),
                      (("--local", "--preset", "nope"), "unknown preset"),
                      (("--local", "--set", "train.lr=1"), "unknown config section")):
        r = _run_all(*args, "--work-dir", str(tmp_path / "w"))
        assert r.returncode == 2, (args, r.stderr)
        errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and msg in errors[0], r.stderr


def test_duplicate_seeds_are_refused_before_anything_runs(tmp_path):
    for mode in ("--dry-run", "--local"):
        r = _run_all(mode, "--work-dir", str(tmp_path / "w"), "--seeds", "42,7,42")
        assert r.returncode == 2 and r.stderr.strip() == (
            "error: --seeds lists seed 42 more than once ('42,7,42'): its stages would run twice on the same files")
        assert not (tmp_path / "w").exists()


def test_a_failed_local_run_leaves_its_log_and_status(tmp_path):
    work = tmp_path / "w"
    missing = [a for s in ("train", "val", "test") for a in ("--set", f"data.{s}_file={tmp_path / s}.jsonl")]
    r = _run_all("--local", "--work-dir", str(work), "--set", "data.source=jsonl", *missing)
    log = work / "local" / "logs" / "stage_0_setup.log"
    assert r.returncode == 1 and f"error: stage_0_setup failed for seed 42 (log: {log})" in r.stderr
    assert "data file not found" in log.read_text()
    status = _run_all("--status", "--work-dir", str(work))
    assert status.returncode == 1, status.stdout + status.stderr
    assert "every stage and seed recorded in" in status.stdout
    assert f"FAILED: stage_0_setup (seed -); log: {log}" in status.stdout
    history = (work / "local" / "history.tsv").read_text().splitlines()
    assert history[0] == "job_id\tstage\tseed\tlog\tunix_time" and history[1].startswith("local\tstage_0_setup\t42\t")


def test_status_shows_every_stage_and_seed_the_work_dir_ever_ran(tmp_path):
    """Three invocations, as run_all.sh records them: seed 42 locally, then seed 7 locally, then a
    grid's baseline on SLURM. Each (stage, seed) shows its latest run; shared stages carry no seed."""
    import sys
    work = tmp_path / "w"
    local, slurm = work / "local", work / "slurm"
    for d in (local / "status", slurm / "status"):
        d.mkdir(parents=True)
    head = "job_id\tstage\tseed\tlog\tunix_time\n"
    rows = [(local, "local", stage, seed, when) for when, seed in ((100, 42), (200, 7))
            for stage in ("stage_0_setup", "stage_1_apply_monotonicity", "stage_7_aggregate")]
    rows.append((slurm, "123", "stage_2_train_baseline", 42, 300))
    for record in (local, slurm):
        (record / "history.tsv").write_text(head + "".join(f"{j}\t{s}\t{seed}\t{record}/{s}.log\t{w}\n"
                                                          for r, j, s, seed, w in rows if r == record))
    for record, job, stage, seed, _ in rows:
        tag = stage if stage in ("stage_0_setup", "stage_7_aggregate") else f"{stage}_seed{seed}"
        (record / "status" / tag).write_text(f"done {job}\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "pipeline_status.py"), str(work)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    table = [line.split() for line in r.stdout.splitlines()[2:]]
    assert [(cols[1], cols[2], cols[3]) for cols in table] == [
        ("stage_0_setup", "-", "done"), ("stage_1_apply_monotonicity", "7", "done"),
        ("stage_1_apply_monotonicity", "42", "done"), ("stage_2_train_baseline", "42", "done"),
        ("stage_7_aggregate", "-", "done")]
    assert table[3][0] == "123"


def test_help_of_both_entry_points_is_their_usage():
    r = _run_all("--help")
    assert r.returncode == 0 and r.stdout.splitlines()[0].startswith("Run the whole pipeline")
    assert "set -euo" not in r.stdout and r.stdout.rstrip().endswith("(exit 1).")
    t = subprocess.run(["bash", str(ROOT / "run_tests.sh"), "--help"], capture_output=True, text=True, timeout=60)
    assert t.returncode == 0 and "unknown mode" not in t.stderr and "integration" in t.stdout


def test_dry_run_derives_the_time_limits_from_the_counted_work(tmp_path):
    """pythia-1.4b on one GPU: stages 2-6 get limits from their FLOPs at the stated throughput, explained on
    stderr; work beyond a day is requeued runs (stages 2-6 all requeue: training checkpoints, measurement keeps
    each arm it finished); MONO_SLURM_TIME_<N> still wins."""
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), "--preset", "pythia-1.4b",
                 env_extra={"MONO_SLURM_TIME_6": "03:00:00"})
    assert r.returncode == 0, r.stderr
    assert "time limits of stages 2-6 (N = 1,414.0M parameters; A100 bf16 peak 312 TFLOP/s" in r.stderr
    lines = {int(l.split()[1].rstrip(":")): l for l in r.stderr.splitlines() if l.startswith("  stage ")}
    assert set(lines) == {2, 3, 4, 5, 6} and "about 5 requeued runs" in lines[2]
    jobs = {n: next(l for l in r.stdout.splitlines() if f"--job-name mono-{n}-s42 " in l) for n in range(2, 7)}
    assert "--time 24:00:00" in jobs[2] and "--time 24:00:00" in jobs[3]
    assert lines[4].endswith(jobs[4].split("--time ")[1].split()[0]) and "--requeue" in jobs[4]
    assert "--time 03:00:00" in jobs[6] and all("--requeue" in jobs[n] for n in (5, 6))
    # UAT counted at 6 sweeps per restart (one job), its ceiling of 50 (~51 h) stated beside it
    assert lines[5].endswith(jobs[5].split("--time ")[1].split()[0]) and "requeued runs" not in lines[5]
    assert re.search(r"restarts counted at 6 sweeps; every restart at the ceiling of 50: [\d.]+ h", lines[5]), lines[5]
    # 8 GPUs for training and measurement divide the estimates.
    eight = _run_all("--dry-run", "--work-dir", str(tmp_path), "--preset", "pythia-1.4b",
                     env_extra={"MONO_SLURM_GPUS_PER_NODE": "8", "MONO_SLURM_MEASURE_PROCS": "8"})
    hours = lambda line: float(re.search(r"~([\d.]+) h", line).group(1))   # noqa: E731
    est = {int(l.split()[1].rstrip(":")): hours(l) for l in eight.stderr.splitlines() if l.startswith("  stage ")}
    one = {n: hours(l) for n, l in lines.items()}
    assert all(est[n] == pytest.approx(one[n] / 8, rel=0.02) for n in lines)


def test_dry_run_shows_the_ladder_and_a_seed_costs_no_more_than_before_it(tmp_path):
    """The pythia-1.4b preset's controls of the same history are counted: stage 3 trains the ladder's rungs,
    stages 4-6 measure them, and stages 2-6 together stay at or below the 262.6 A100-hours per seed the former
    design counted (three released revisions measured, 3 x 50M-token sweeps of cosine runs)."""
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), "--preset", "pythia-1.4b")
    assert r.returncode == 0, r.stderr
    lines = {l.split(":")[0].strip(): l for l in r.stderr.splitlines() if l.startswith("  ")}
    assert "2 arm(s) and 2 ladder rung(s)" in lines["stage 3"] and "(0.288B of them the ladder's)" in lines["stage 3"]
    assert "7 arms" in lines["stage 6"]
    assert "rungs of 57.6M, 230.4M tokens (1/32, 1/8 of 1843M)" in lines["ladder (controls.ladder)"]
    total = float(re.search(r"~([\d.]+) A100-hours per seed", lines["stages 2-6 together"]).group(1))
    assert total <= 262.6


def test_no_job_asks_for_more_than_the_cluster_allows_and_a_stage_that_cannot_fit_is_refused(tmp_path):
    """MONO_SLURM_MAX_TIME (else the partition's MaxTime and the QOS's MaxWall): pythia-1.4b on one A100 under a
    12-hour limit: every job asks for 12 h at most and stages 2-6 requeue past it. Under 4 hours one UAT restart
    on one arm (~2.4 h counted, twice that with the margin) cannot finish in a job: one error line, nothing
    submitted."""
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), "--preset", "pythia-1.4b",
                 env_extra={"MONO_SLURM_MAX_TIME": "12:00:00"})
    assert r.returncode == 0, r.stderr
    asked = [l.split("--time ")[1].split()[0] for l in r.stdout.splitlines() if l.startswith("sbatch ")]
    assert len(asked) == 8 and max(asked) == "12:00:00", asked
    assert "cluster limit: MONO_SLURM_MAX_TIME=12:00:00 (12:00:00): no job asks for more" in r.stderr
    assert re.search(r"stage 5: .* -> 12:00:00, about \d+ requeued runs", r.stderr), r.stderr
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), "--preset", "pythia-1.4b",
                 env_extra={"MONO_SLURM_MAX_TIME": "4:00:00"})
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and not r.stdout.strip(), r.stdout + r.stderr
    assert "stage 5 cannot finish in requeued jobs of 04:00:00: one UAT restart on one arm" in errors[0]
    assert "a partition with a longer MaxTime, more processes (MONO_SLURM_MEASURE_PROCS)" in errors[0]
    # 8 measuring processes share each restart's queries: its piece fits again.
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), "--preset", "pythia-1.4b",
                 env_extra={"MONO_SLURM_MAX_TIME": "4:00:00", "MONO_SLURM_MEASURE_PROCS": "8"})
    assert r.returncode == 0, r.stderr
    # With no cluster limit (or one above it) jobs still ask for 24 h at most: pythia-12b's UAT restart on one
    # GPU (~20 h counted) cannot fit one, and no longer partition helps.
    for env in ({}, {"MONO_SLURM_MAX_TIME": "2-00:00:00"}):
        r = _run_all("--dry-run", "--work-dir", str(tmp_path), "--preset", "pythia-6.9b", "--set",
                     "model.hub_id=EleutherAI/pythia-12b", env_extra=env)
        assert r.returncode == 2 and "stage 5 cannot finish in requeued jobs of 24:00:00" in r.stderr, r.stderr
        assert "longer MaxTime" not in r.stderr
    # A stage's own stated limit (MONO_SLURM_TIME_<N>) is what its piece must fit, and no more than the cluster's.
    twelve = ("--dry-run", "--work-dir", str(tmp_path), "--preset", "pythia-6.9b", "--set", "model.hub_id=EleutherAI/pythia-12b")
    assert _run_all(*twelve, env_extra={"MONO_SLURM_TIME_5": "48:00:00"}).returncode == 0
    r = _run_all(*twelve, env_extra={"MONO_SLURM_TIME_5": "3-00:00:00", "MONO_SLURM_MAX_TIME": "2-00:00:00"})
    assert r.returncode == 2 and "MONO_SLURM_TIME_5=72:00:00 asks for more than the cluster allows (48:00:00)" in r.stderr


@pytest.mark.parametrize("text, hours", [("90", 1.5), ("30:00", 0.5), ("12:30:00", 12.5), ("2-00", 48.0),
                                         ("1-06:00", 30.0), ("1-00:00:30", 24 + 1 / 120), ("UNLIMITED", None),
                                         ("INFINITE", None)])
def test_slurm_times_are_read_in_every_form_sbatch_accepts(text, hours):
    from utils.run.time_limits import slurm_hours
    assert slurm_hours(text) == (pytest.approx(hours) if hours else None)


def test_dry_run_budgets_host_memory_and_disk_and_asks_for_the_memory_it_counts(tmp_path):
    """pythia-6.9b on 8 GPUs: no job over 24 h; each job's --mem comes from its counted host memory (stage 2:
    rank 0's one whole fp32 model, 5 bytes a parameter (4.6 measured), and 8 processes' runtime; checkpoints
    stream, so the node's shards are no longer counted twice over at 24 bytes a parameter), the disk per seed
    is stated, and MONO_SLURM_MEM still wins."""
    env = {"MONO_SLURM_GPUS_PER_NODE": "8", "MONO_SLURM_MEASURE_PROCS": "8"}
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), "--preset", "pythia-6.9b", env_extra=env)
    assert r.returncode == 0, r.stderr
    jobs = {int(l.split("--job-name mono-")[1].split("-")[0]): l for l in r.stdout.splitlines() if l.startswith("sbatch")}
    assert max(j.split("--time ")[1].split()[0] for j in jobs.values()) == "24:00:00"
    mem = {n: int(j.split("--mem ")[1].split("G")[0]) for n, j in jobs.items()}
    assert mem[2] == mem[3] >= 1.5 * (5 * 6.85e9 / 2 ** 30 + 8 * 4) and mem[0] == 64 and mem[7] == 16, mem
    assert mem[2] < 1.5 * 24 * 6.85e9 / 2 ** 30, mem
    line = next(l for l in r.stderr.splitlines() if l.startswith("host memory per node"))
    assert "stage 2 ~" in line and f"-> {mem[2]}G" in line
    gpu = next(l for l in r.stderr.splitlines() if l.startswith("GPU memory"))
    assert "a whole fp32 arm, ~27.4 GB" in gpu and "constrained weights (~17.2 GB)" in gpu, gpu
    disk = next(l for l in r.stderr.splitlines() if l.startswith("disk:"))
    assert re.match(r"disk: ~\d+ GB per finished seed .* ~[\d.e+]+ GB at its peak", disk), disk
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), "--preset", "pythia-6.9b",
                 env_extra={**env, "MONO_SLURM_MEM": "500G"})
    assert all("--mem 500G" in l for l in r.stdout.splitlines() if "--job-name mono-2-" in l)
