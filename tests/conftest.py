"""Shared fixtures: a real tiny pipeline work dir, built once per test session."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402,F401  (registers monotone_gelu)
from configs.experiment_config import load_config  # noqa: E402
from utils.run_files import RunPaths  # noqa: E402

# Small budgets: the behaviour under test does not depend on a well-trained model.
FAST = [("pretrain.max_tokens", "120000"), ("monotone.cert_trials", "16")]


def tiny_config(work_dir: Path, extra=()):
    return load_config("tiny", [*FAST, ("work_dir", str(work_dir)), *extra])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(cfg, paths) of a work dir where stage 0 has run on the tiny preset."""
    from utils.stages import setup
    work = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(work)
    paths = RunPaths(work, cfg.seed)
    setup(cfg, paths)
    return cfg, paths


def run_script(name: str, *args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def fast_sets() -> list[str]:
    return [a for k, v in FAST for a in ("--set", f"{k}={v}")]
