"""benchmarks/gpu_check.sh, which runs for real only on a GPU machine: what can be checked here is that it
refuses in one line what it cannot run on, that its test selection holds the GPU checks it promises, NCCL
first, that its pipeline settings are a valid config, and that the benchmarks' GPU code runs (at the tiny
preset, on the CPU) before any GPU time is spent on it."""
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _part(name: str) -> str:
    """The command of one part: its line and the lines its backslashes continue it onto."""
    lines = SCRIPT.read_text()[SCRIPT.read_text().index(f"part {name} "):].splitlines()
    end = next(i for i, line in enumerate(lines) if not line.endswith("\\"))
    return "\n".join(lines[:end + 1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for real")
def test_without_cuda_it_stops_at_once_with_one_error_line(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}   # the venv's python3
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: no CUDA device here: gpu_check.sh is for a GPU machine"]


def test_a_python3_without_the_packages_is_named_in_one_line(tmp_path):
    """A GPU image's python3 without the wheel folder: one line naming what it lacks, exit 2, nothing run."""
    venv.create(tmp_path / "bare", with_pip=False)
    env = {"PATH": f"{tmp_path / 'bare' / 'bin'}:/usr/bin:/bin"}
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: python3 lacks torch (No module named 'torch')") and "lm_eval" in lines[0]
    assert "gpu_wheels.sh" in lines[0] and not list((tmp_path / "out").iterdir())


def _collected(part: str) -> list[str]:
    """The test names a part's pytest command selects, in the order it runs them."""
    args = re.findall(r"tests/test_\w+\.py(?:::\w+)?", part)
    k = re.search(r'-k "([^"]+)"', part)
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args,
                        *(["-k", k.group(1)] if k else [])], capture_output=True, text=True, cwd=ROOT, timeout=300)
    return [line.split("::")[1].split("[")[0] for line in r.stdout.splitlines() if "::" in line]


def test_its_tests_parts_select_the_gpu_checks_nccl_first():
    text = SCRIPT.read_text()
    assert re.search(r"DETERMINISTIC=\(env MONO_DETERMINISTIC=1 CUBLAS_WORKSPACE_CONFIG=:4096:8\)", text)
    resume, records = _part("tests_resume"), _part("tests_records")
    assert '"${DETERMINISTIC[@]}"' in resume and '"${DETERMINISTIC[@]}"' in records
    assert _collected(resume) == ["test_one_nccl_process_checkpoints_and_resumes_bitwise",      # NCCL, FSDP2, DCP
                                  "test_resume_after_sigkill_is_bitwise_identical",             # 1-process resume
                                  "test_the_best_weights_are_kept_sharded_and_exported_once_at_the_end"]
    names = _collected(records)
    assert {"test_text_attack_records_are_recomputable_and_beat_random_flips",   # records at their precision
            "test_evaluation_is_recomputable_from_what_it_names",
            "test_uat_records_are_recomputable_on_disjoint_texts",
            "test_records_of_either_precision_agree_with_the_other"} <= set(names)
    assert "test_the_time_limits_count_at_least_the_work_the_attacks_did" not in names  # not GPU-specific


def test_its_pipeline_settings_are_a_valid_tiny_config():
    """The pipeline part once passed pretrain.max_tokens below the preset's control snapshot: stage 0 exited 2."""
    from configs.presets import load_config
    pairs = [tuple(kv.split("=", 1)) for kv in re.findall(r"--set (\S+)", _part("pipeline"))]
    assert load_config("tiny", pairs).pretrain.max_tokens == 120000      # raises on an invalid combination
    assert 'cp "$PIPELINE/final/results.md"' in SCRIPT.read_text()      # where stage 7 writes the report


def test_its_benchmarks_skip_their_cpu_half_and_default_to_the_preset():
    from configs.presets import load_config
    for name in ("bench_training", "bench_attacks"):
        assert "--gpu-only" in _part(name)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    default = int(re.search(r"default (\d+): the pythia-1.4b preset's micro-batch", " ".join(r.stdout.split())).group(1))
    assert default == load_config("pythia-1.4b").recovery_monotone.micro_batch_size == 8
    assert "--gpu-micro-batch" not in SCRIPT.read_text()          # gpu_check.sh keeps the default
    assert re.search(r"timeout -k \d+", SCRIPT.read_text())       # TERM first (the stages checkpoint), then KILL


@pytest.mark.slow
def test_the_benchmarks_gpu_code_runs_at_the_tiny_preset():
    """The GPU halves, on the CPU at the tiny preset: each arm's model is built afresh (the monotone arm once
    broke the next arm's config) and every figure is a positive number."""
    import bench_attacks
    import bench_training
    t = bench_training.gpu_benchmark(1, 2, ["baseline", "softplus_abs"], preset_name="tiny", device="cpu")
    assert [(r["arm"], r["gradient_checkpointing"]) for r in t["runs"]] == [
        ("baseline", True), ("baseline", False), ("softplus_abs", True), ("softplus_abs", False)]
    assert all(r["tokens_per_s"] > 0 and r["hours_for_preset_budget"] > 0 for r in t["runs"])
    a = bench_attacks.pythia_shape(16, gcg_steps=1, ppl_docs=1, preset_name="tiny", device="cpu")
    assert set(a["arms"]) == {"baseline", "softplus_abs"}
    for r in a["arms"].values():
        assert r["batched"] > 0 and r["gcg_seconds_per_step"] > 0 and r["perplexity_scored_tokens_per_s"] > 0
