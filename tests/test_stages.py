"""Stage scripts end to end on the tiny preset: outputs, flags, exit codes."""
import json
import shutil

import pytest

from conftest import fast_sets, run_script

pytestmark = pytest.mark.slow


def test_pipeline_local_script_passes():
    import test_pipeline_local
    sets = ["pretrain.max_tokens=120000", "monotone.cert_trials=16",
            "recovery_baseline.max_tokens=60000", "recovery_monotone.max_tokens=60000",
            "attack.uat_opt_texts=6", "attack.uat_eval_texts=8", "attack.uat_restarts=1",
            "attack.uat_max_sweeps=2", "attack.hotflip_texts=10", "attack.hotflip_max_flips=3"]
    assert test_pipeline_local.main([a for kv in sets for a in ("--set", kv)]) == 0


def _copy_stage0(tiny_run, tmp_path):
    _, paths = tiny_run
    work = tmp_path / "work"
    shutil.copytree(paths.shared, work / "shared")
    return work


def test_stage_1_keep_gelu_is_labelled_not_monotone(tiny_run, tmp_path):
    work = _copy_stage0(tiny_run, tmp_path)
    r = run_script("stage_1_apply_monotonicity", "--work-dir", str(work), *fast_sets(),
                   "--set", "monotone.activation=keep")
    assert r.returncode == 0, r.stderr
    cert = json.loads((work / "seed_42" / "results" / "monotonicity_certificate.json").read_text())
    assert cert["monotone"] is False and cert["configured_monotone"] is False
    assert cert["label"].startswith("NOT MONOTONE") and cert["total_violations"] > 0
    assert "NOT MONOTONE" in r.stdout


def test_stage_1_reruns_when_config_changes_and_skips_when_not(tiny_run, tmp_path):
    work = _copy_stage0(tiny_run, tmp_path)
    args = ("--work-dir", str(work), *fast_sets())
    assert run_script("stage_1_apply_monotonicity", *args).returncode == 0
    assert "already done" in run_script("stage_1_apply_monotonicity", *args).stdout
    r = run_script("stage_1_apply_monotonicity", *args, "--set", "monotone.scope=mlp_in")
    assert r.returncode == 0 and "already done" not in r.stdout
    cert = json.loads((work / "seed_42" / "results" / "monotonicity_certificate.json").read_text())
    assert cert["scope"] == "mlp_in"


def test_stage_1_without_stage_0_fails_cleanly(tmp_path):
    r = run_script("stage_1_apply_monotonicity", "--work-dir", str(tmp_path / "empty"), *fast_sets())
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: [stage_1_apply_monotonicity] stage 0 has not run")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "empty" / "seed_42" / "flags").exists()


def test_corrupt_pretrained_model_is_one_clear_error_and_keeps_outputs(tiny_run, tmp_path):
    work = _copy_stage0(tiny_run, tmp_path)
    manifest = json.loads((work / "shared" / "manifest.json").read_text())
    pre = work / "shared" / "models" / "pretrained"
    manifest["pretrained_path"] = str(pre)
    (work / "shared" / "manifest.json").write_text(json.dumps(manifest))
    weights = next(pre.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    r = run_script("stage_1_apply_monotonicity", "--work-dir", str(work), *fast_sets())
    assert r.returncode == 1 and "cannot load model" in r.stderr and "Traceback" not in r.stderr
    assert (work / "shared" / "manifest.json").exists() and weights.exists()
