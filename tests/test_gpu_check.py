"""benchmarks/gpu_check.sh, which only a GPU machine runs: what can be checked here is that it refuses a
machine without CUDA in one line, that its test selection holds the GPU checks it promises, and that its
training benchmark runs at the preset's micro-batch."""
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for real")
def test_without_cuda_it_stops_at_once_with_one_error_line(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: no CUDA device here: gpu_check.sh is for a GPU machine"]


def test_its_tests_part_selects_the_resume_checks_with_deterministic_kernels():
    text = SCRIPT.read_text()
    part = text[text.index("part tests"):text.index('echo "=== $failed')]
    assert "MONO_DETERMINISTIC=1" in part and "CUBLAS_WORKSPACE_CONFIG=:4096:8" in part
    files = re.findall(r"tests/test_\w+\.py", part)
    selection = re.search(r'-k "([^"]+)"', part).group(1)
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files,
                        "-k", selection], capture_output=True, text=True, cwd=ROOT, timeout=300)
    collected = [line for line in r.stdout.splitlines() if "::" in line]
    names = {line.split("::")[1].split("[")[0] for line in collected}
    assert "test_one_nccl_process_checkpoints_and_resumes_bitwise" in names             # NCCL, FSDP2, DCP
    assert {"test_resume_after_sigkill_is_bitwise_identical",
            "test_resume_is_bitwise_identical_for_the_other_constructions"} <= names    # 1-process resume
    assert not any(l.startswith("tests/test_distributed.py") and "nccl" not in l for l in collected)


def test_its_training_benchmark_runs_at_the_preset_micro_batch():
    from configs.presets import load_config
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    default = int(re.search(r"default (\d+): the pythia-1.4b preset's micro-batch", " ".join(r.stdout.split())).group(1))
    assert default == load_config("pythia-1.4b").recovery_monotone.micro_batch_size == 8
    assert "--gpu-micro-batch" not in SCRIPT.read_text()          # gpu_check.sh keeps the default
