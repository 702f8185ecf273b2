"""Recovery training on several processes (gloo on CPU stands in for NCCL on GPUs).

Real torchrun where the launcher matters; elsewhere the ranks are started directly with
torchrun's variables (RANK, WORLD_SIZE, ...), as srun can, so each rank's exit code is seen.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, fast_sets
from utils.train.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow

STAGE = "stage_3_train_monotonic"
SCRIPT = str(ROOT / "scripts" / f"{STAGE}.py")
# 8 sequences of 128 tokens per optimizer step, a checkpoint every 3 steps.
def _short(steps):
    return ["--set", f"recovery_monotone.max_tokens={steps * 1024}", "--set", "recovery_monotone.micro_batch_size=8",
            "--set", "recovery_monotone.checkpoint_every_steps=3", "--set", "recovery_monotone.eval_interval=5",
            "--set", "recovery_monotone.eval_windows=8"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _clone(stage1_work, tmp_path, name):
    shutil.copytree(stage1_work, tmp_path / name)
    return tmp_path / name


def _torchrun(work, nproc, steps, *extra, timeout=300):
    return subprocess.run([*TORCHRUN, "--nproc_per_node", str(nproc), SCRIPT, "--work-dir", str(work),
                           *fast_sets(), *_short(steps), *extra], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def _single(work, steps, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, "--work-dir", str(work), *fast_sets(), *_short(steps)],
                          capture_output=True, text=True, env=ENV, timeout=timeout)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(work, nproc, steps):
    """The ranks of one job, started as torchrun would start them."""
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, SCRIPT, "--work-dir", str(work), *fast_sets(), *_short(steps)],
                             env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                                  "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(nproc)]


def _descendants(pid):
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for c in children] + [d for c in children for d in _descendants(int(c))]


def _checkpoint_steps(work):
    return sorted(int(p.name.split("_")[1]) for p in (work / "seed_42" / "checkpoints" / "monotonic").glob("step_*"))


def _wait_for_checkpoint(work, procs, min_step, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _checkpoint_steps(work) and _checkpoint_steps(work)[-1] >= min_step:
            return
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def _model(work):
    return load_file(next((work / "seed_42" / "models" / "monotonic").glob("*.safetensors")))


def _last_checkpoint(work):
    ckpts = sorted((work / "seed_42" / "checkpoints" / "monotonic").glob("step_*"))
    return read_checkpoint(ckpts[-1])


# Float tolerance between world sizes (the same windows and the same mean loss, summed in another
# order): relative L2 difference of the whole model <= 1e-4 and of every tensor <= 1e-3, except the
# attention QKV bias: its key part has an exactly zero gradient (softmax ignores a shift shared by all
# keys), and Adam normalises that gradient's rounding noise into steps of size lr in either direction.
WHOLE, PER_TENSOR, ZERO_GRADIENT = 1e-4, 1e-3, "attention.query_key_value.bias"


def _relative_differences(a, b):
    """(whole-model relative L2 difference, worst relative difference of a tensor other than the QKV bias)."""
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
    den = sum(float(a[k].double().pow(2).sum()) for k in a) ** 0.5
    per = max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)) for k in a if ZERO_GRADIENT not in k)
    return num / den, per


@pytest.fixture(scope="module")
def one_process(stage1_work, tmp_path_factory):
    """Uninterrupted 1-process run of 12 steps: final exported model."""
    work = _clone(stage1_work, tmp_path_factory.mktemp("one"), "w")
    r = _single(work, 12)
    assert r.returncode == 0, r.stderr
    return _model(work)


@pytest.fixture(scope="module")
def two_processes(stage1_work, tmp_path_factory):
    """Uninterrupted torchrun run on 2 processes, 12 steps: (work dir, last checkpoint, exported model)."""
    work = _clone(stage1_work, tmp_path_factory.mktemp("two"), "w")
    r = _torchrun(work, 2, 12)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    return work, _last_checkpoint(work), _model(work)


def test_two_processes_train_what_one_process_trains(one_process, two_processes):
    work, _, model = two_processes
    whole, per = _relative_differences(one_process, model)
    assert whole <= WHOLE and per <= PER_TENSOR, (whole, per)
    # Same export as one process: a Hugging Face directory with materialised weights W >= 0.
    assert set(model) == set(one_process)
    ffn = [k for k in model if "mlp" in k and k.endswith("weight")]
    assert ffn and all(model[k].min() >= 0 for k in ffn)
    assert (work / "seed_42" / "flags" / f"{STAGE}.done").exists()
    # The finished arm keeps its last checkpoint only: one shard per rank.
    ckpts = work / "seed_42" / "checkpoints" / "monotonic"
    assert [p.name for p in ckpts.glob("step_*")] == ["step_00000012"] and len(list(ckpts.glob("step_*/shard-*"))) == 2


def test_sigkill_two_processes_then_resume_is_bitwise_identical(stage1_work, two_processes, tmp_path):
    work = _clone(stage1_work, tmp_path, "killed")
    launcher = subprocess.Popen([*TORCHRUN, "--nproc_per_node", "2", SCRIPT, "--work-dir", str(work), *fast_sets(),
                                 *_short(12)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(work, [launcher], min_step=6)
    time.sleep(0.3)                                   # inside a later step
    for pid in [launcher.pid, *_descendants(launcher.pid)]:    # the launcher and both ranks: a lost node
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    assert _checkpoint_steps(work)[-1] < 12
    assert not (work / "seed_42" / "flags" / f"{STAGE}.done").exists()
    r = _torchrun(work, 2, 12)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    _, ckpt, model = two_processes
    last = _last_checkpoint(work)
    assert last.keys() == ckpt.keys()
    assert all(torch.equal(last[k], ckpt[k]) for k in ckpt)       # weights, V, Adam moments, step counts
    resumed = _model(work)
    assert all(torch.equal(resumed[k], model[k]) for k in model)


def _preempt(ranks, signalled):
    """Signal one rank; every rank must checkpoint and exit 75 (none left waiting in a collective)."""
    ranks[signalled].send_signal(signal.SIGUSR1)
    outs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [75] * len(ranks), [o[1][-2000:] for o in outs]
    return outs


def test_a_signal_to_any_rank_stops_all_and_a_single_process_resumes(stage1_work, one_process, tmp_path):
    work = _clone(stage1_work, tmp_path, "two_then_one")
    ranks = _start_ranks(work, 2, 12)
    _wait_for_checkpoint(work, ranks, min_step=3)
    outs = _preempt(ranks, signalled=1)              # not rank 0: the others learn it through a collective
    assert "rerun the same command to resume" in outs[0][1]
    stopped_at = _checkpoint_steps(work)[-1]
    assert stopped_at < 12
    assert not (work / "seed_42" / "flags" / f"{STAGE}.done").exists()
    r = _single(work, 12)                            # 2 processes wrote it, 1 resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"(step {stopped_at})" in r.stdout and "random number generators are not restored" in r.stdout
    whole, per = _relative_differences(one_process, _model(work))
    assert whole <= WHOLE and per <= PER_TENSOR, (whole, per)


def test_a_single_process_checkpoint_resumes_on_two(stage1_work, one_process, tmp_path):
    work = _clone(stage1_work, tmp_path, "one_then_two")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--work-dir", str(work), *fast_sets(), *_short(12)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(work, [proc], min_step=3)
    _preempt([proc], signalled=0)
    stopped_at = _checkpoint_steps(work)[-1]
    r = _torchrun(work, 2, 12)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"(step {stopped_at})" in r.stdout
    report = json.loads((work / "seed_42" / "results" / "training_monotonic.json").read_text())
    history = [row["step"] for row in report["history"]["steps"]]
    assert history == sorted(set(history)) and history[-1] == 12
    whole, per = _relative_differences(one_process, _model(work))
    assert whole <= WHOLE and per <= PER_TENSOR, (whole, per)
    # The record says which processes trained which steps.
    assert report["processes"] == [1, 2] and report["history"]["segments"] == [
        {"first_step": 0, "last_step": stopped_at, "processes": 1},
        {"first_step": stopped_at, "last_step": 12, "processes": 2}]
    # --force under torchrun retrains the whole arm on 2 processes rather than resuming the finished one.
    r = _torchrun(work, 2, 12, "--force")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" not in r.stdout and "--force: starting afresh" in r.stdout
    report = json.loads((work / "seed_42" / "results" / "training_monotonic.json").read_text())
    assert report["processes"] == [2] and report["history"]["segments"] == [
        {"first_step": 0, "last_step": 12, "processes": 2}]
    assert "removed what --force had set aside" in r.stdout                 # once the rerun has finished
    assert not list((work / "seed_42" / "checkpoints").glob("monotonic.set-aside-*"))


def test_stages_that_run_as_one_process_refuse_torchrun(stage1_work, tmp_path):
    r = subprocess.run([*TORCHRUN, "--nproc_per_node", "1", str(ROOT / "scripts" / "stage_1_apply_monotonicity.py"),
                        "--work-dir", str(tmp_path / "w")], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode != 0
    assert "runs as one process; start it with python, not torchrun" in r.stderr


def test_a_batch_that_does_not_split_over_the_processes_is_one_clear_error(stage1_work, tmp_path):
    work = _clone(stage1_work, tmp_path, "uneven")
    r = subprocess.run([*TORCHRUN, "--nproc_per_node", "3", SCRIPT, "--work-dir", str(work), *fast_sets(),
                        *_short(3)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode != 0
    assert "8 sequences per optimizer step (micro_batch_size x grad_accum_steps) do not split evenly over 3" \
        in r.stderr


@pytest.mark.parametrize("construction", ["signed_units", "projected"])
def test_two_processes_train_what_one_process_trains_for_the_other_constructions(stage1_work, tmp_path, construction):
    """signed_units' unit signs (a buffer beside the sharded V) and projected's clamp of sharded W."""
    sets = ["--set", f"monotone.construction={construction}"]
    base = tmp_path / "base"
    shutil.copytree(stage1_work / "shared", base / "shared")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "stage_1_apply_monotonicity.py"), "--work-dir",
                        str(base), *fast_sets(), *sets], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    one, two = _clone(base, tmp_path, "one"), _clone(base, tmp_path, "two")
    r1 = subprocess.run([sys.executable, SCRIPT, "--work-dir", str(one), *fast_sets(), *_short(6), *sets],
                        capture_output=True, text=True, env=ENV, timeout=300)
    r2 = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", SCRIPT, "--work-dir", str(two), *fast_sets(), *_short(6),
                         *sets], capture_output=True, text=True, env=ENV, timeout=300)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-2000:] + r2.stderr[-2000:]
    whole, per = _relative_differences(_model(one), _model(two))
    assert whole <= WHOLE and per <= PER_TENSOR, (whole, per)
    cert = json.loads((two / "seed_42" / "results" / "monotonicity_certificate_monotonic.json").read_text())
    assert cert["monotone"] and cert["construction"] == construction


def test_two_processes_in_bf16_mixed_train_what_one_process_trains(stage1_work, tmp_path):
    """bf16-mixed (the CUDA default) on 2 ranks computes the autocast forward of one process over float32
    weights gathered in float32, so W = softplus(V) comes from the same fp32 V. Under autocast every
    gradient is a bf16 GEMM output, so no two kernels agree to fp32 tolerance: one process with 4+4
    accumulated windows and one with 8 already differ by ~2e-3 (relative L2, 6 steps). The 2-rank model
    must lie within that (measured 1.3e-3 from the 4+4 run); FSDP's bf16 param_dtype, the policy this
    replaced, lay at 6.4e-3."""
    sets = ["--set", "precision=bf16-mixed"]
    split = ["--set", "recovery_monotone.micro_batch_size=4", "--set", "recovery_monotone.grad_accum_steps=2"]
    one, two, eight = (_clone(stage1_work, tmp_path, n) for n in ("one", "two", "eight"))
    runs = [subprocess.run([sys.executable, SCRIPT, "--work-dir", str(w), *fast_sets(), *_short(6), *sets, *extra],
                           capture_output=True, text=True, env=ENV, timeout=300) for w, extra in ((one, split), (eight, []))]
    runs.append(_torchrun(two, 2, 6, *sets))
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    report = json.loads((two / "seed_42" / "results" / "training_monotonic.json").read_text())
    assert report["history"]["precision"] == "bf16-mixed"
    ranks, _ = _relative_differences(_model(one), _model(two))
    regrouped, _ = _relative_differences(_model(one), _model(eight))
    assert 0 < ranks <= regrouped, (ranks, regrouped)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a GPU; on CPU the 2-rank gloo tests cover this")
def test_one_nccl_process_checkpoints_and_resumes_bitwise(stage1_work, tmp_path):
    """benchmarks/gpu_check.sh (MONO_DETERMINISTIC=1): torchrun with 1 process on a GPU is NCCL, FSDP2
    and DCP for real; a run killed after a checkpoint resumes to the uninterrupted run's bits."""
    whole = _clone(stage1_work, tmp_path, "whole")
    r = _torchrun(whole, 1, 12)
    assert r.returncode == 0, r.stderr[-3000:]
    killed = _clone(stage1_work, tmp_path, "killed")
    launcher = subprocess.Popen([*TORCHRUN, "--nproc_per_node", "1", SCRIPT, "--work-dir", str(killed), *fast_sets(),
                                 *_short(12)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(killed, [launcher], min_step=6)
    for pid in [launcher.pid, *_descendants(launcher.pid)]:
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    r = _torchrun(killed, 1, 12)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    a, b = _last_checkpoint(whole), _last_checkpoint(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_other_than_0_never_hold_the_whole_model(tmp_path):
    """Training's start under torchrun: rank 0 reads the saved weights, rank 1 builds the model on the
    meta device and receives only its shard; the shards hold exactly the saved weights."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from utils.model.modeling import save_model
    from utils.model.monotonicity import apply_monotonicity
    config = GPTNeoXConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                           intermediate_size=2048, hidden_act="gelu", tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config)
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6)
    save_model(model, tmp_path / "model")
    model_kib = sum(p.numel() * 4 for p in model.parameters()) / 1024          # 118 MB of float32
    largest_kib = max(p.numel() * 4 for p in model.parameters()) / 1024        # an embedding, 8 MB
    # A fixed mmap threshold: glibc's adaptive one would keep freed multi-MB tensors resident, so that the
    # resident size tracks live tensors.
    r = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", str(ROOT / "tests" / "rank_memory.py"),
                        str(tmp_path / "model"), str(tmp_path)], capture_output=True, text=True,
                       env={**ENV, "MALLOC_MMAP_THRESHOLD_": "131072"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["equal"]
    assert rank0["peak_growth_kib"] > model_kib, (rank0, model_kib)     # a whole copy: what every rank held before
    # Its half, and the tensor being broadcast (received whole, then cut; twice for allocator slack).
    assert rank1["peak_growth_kib"] < model_kib / 2 + 2 * largest_kib + 4096, (rank1, model_kib)
