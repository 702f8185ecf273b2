"""Shared fixtures: a real tiny pipeline work dir, built once per test session."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402,F401  (registers monotone_gelu)
from configs.presets import load_config  # noqa: E402
from utils.run.run_files import RunPaths  # noqa: E402

# Small budgets: the behaviour under test does not depend on a well-trained model. Stage 0 reads one
# pass of the largest training budget, so every run whose budgets stay within these shares its stage 0.
# One control snapshot (free in stage 0: measured like an arm); the recipe search, the unconstrained_from_init
# control and the ladder (and so the same-history frontier) are off except where a test turns them on
# (test_stages.py's whole-pipeline run); PGD runs on 2 texts.
FAST = [("pretrain.max_tokens", "120000"), ("recovery_baseline.max_tokens", "60000"),
        ("recovery_monotone.max_tokens", "60000"), ("monotone.cert_trials", "16"), ("eval.task_limit", "40"),
        ("controls.pretrain_snapshots", "40000"), ("controls.unconstrained_from_init", "false"),
        ("controls.ladder", ""), ("analysis.frontier", "all"),
        ("recovery_baseline.lr_grid", ""), ("recovery_monotone.lr_grid", ""), ("attack.pgd_texts", "2"),
        ("attack.pgd_steps", "3"), ("attack.gcg_steps", "12"), ("attack.hotflip_top_k", "16")]


def tiny_config(work_dir: Path, extra=()):
    return load_config("tiny", [*FAST, ("work_dir", str(work_dir)), *extra])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(cfg, paths) of a work dir where stage 0 has run on the tiny preset, with its completion flag
    (a copy of its shared/ is a finished stage 0 for any run with the FAST settings)."""
    work = tmp_path_factory.mktemp("tiny_run")
    r = run_script("stage_0_setup", "--work-dir", str(work), *fast_sets())
    assert r.returncode == 0, r.stderr
    cfg = tiny_config(work)
    return cfg, RunPaths(work, cfg.seed)


def run_script(name: str, *args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def fast_sets() -> list[str]:
    return [a for k, v in FAST for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="session")
def stage1_work(tiny_run, tmp_path_factory):
    """A work dir where stages 0 and 1 have run (copy it before training in it)."""
    _, paths = tiny_run
    work = tmp_path_factory.mktemp("train") / "base"
    shutil.copytree(paths.shared, work / "shared")
    r = run_script("stage_1_apply_monotonicity", "--work-dir", str(work), *fast_sets())
    assert r.returncode == 0, r.stderr
    return work
