"""The attack pilot on stages 0-1's arms (a smoke run at toy budgets; the tiny preset's own pilot is in
docs/measurement.md): what it measures is what the searches do, two processes measure what one does, and what
it recommends is a valid config."""
import dataclasses
import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import ROOT, fast_sets, run_script

SETS = ["attack.text_len=16", "attack.min_text_len=8", "attack.gcg_steps=2", "attack.gcg_search_width=4",
        "attack.gcg_top_k=4", "attack.hotflip_top_k=4", "attack.uat_opt_texts=2", "attack.uat_max_sweeps=2",
        "attack.uat_top_k=4", "attack.uat_restarts=2"]
SMOKE = [a for kv in SETS for a in ("--set", kv)]


def test_the_pilot_measures_each_budget_as_its_own_run_would_and_recommends_valid_settings(stage1_work, tmp_path):
    from conftest import tiny_config
    from utils.attacks import gcg, uat
    from utils.attacks.core import Victim, forbidden_tokens, select_texts
    from utils.data.tokenization import TokenFile, load_tokenizer
    from utils.measurement import load_arm
    from utils.run.compute import CPU
    from utils.text_attacks import attacked_texts
    from utils.run.run_files import RunPaths
    work, sharded = tmp_path / "w", tmp_path / "sharded"
    shutil.copytree(stage1_work, work)
    shutil.copytree(stage1_work, sharded)
    r = run_script("attack_pilot", "--work-dir", str(work), "--texts", "2", *fast_sets(), *SMOKE)
    assert r.returncode == 0, r.stderr[-3000:]
    results = work / "seed_42" / "results"
    out = json.loads((results / "attack_pilot.json").read_text())
    assert (results / "attack_pilot.png").stat().st_size > 0 and "| GCG setting |" in (results / "attack_pilot.md").read_text()
    arms = {"pretrained", "monotonic_init", "control_40000"}
    assert all(set(row["damage"]) == arms for row in out["gcg"].values()) and set(out["flips"]) == arms
    # A GCG run's trace holds every shorter run: the pilot's damage at s steps is a run of s steps, rescored.
    cfg = tiny_config(work, [tuple(kv.split("=", 1)) for kv in SETS])
    texts = attacked_texts(cfg, RunPaths(work, 42), out["texts"])
    tok = load_tokenizer(work / "shared" / "tokenizer")
    victim = Victim(load_arm(work / "seed_42" / "models" / "monotonic_init", "cpu"), CPU, cfg.attack.batch_size)
    row = out["gcg"]["width 8, top-k 16"]
    for s, damage in zip(row["steps"], row["damage"]["monotonic_init"]):
        a = dataclasses.replace(cfg.attack, gcg_steps=s, gcg_search_width=8, gcg_top_k=16)
        recs = [gcg.attack_text(victim, t["ids"], a, forbidden_tokens(tok, victim.embeddings.shape[0]),
                                torch.Generator().manual_seed(42 * 100_003 + t["doc"])) for t in texts]
        assert sum(r["abs_delta_nll"] for r in recs) / len(recs) == pytest.approx(damage, abs=1e-5)
    # UAT: the damage at each sweep cap is a stage-5 search with that cap (its best restart), rescored.
    opt = [t["ids"] for t in select_texts(TokenFile(work / "shared" / "tokens", "test"), tok.eos_token_id,
                                          cfg.attack.uat_opt_texts, 16, 8, 42)]
    u = out["uat"]["monotonic_init"]
    for cap, damage in zip(u["sweeps"], u["damage"]):
        found = uat.find_trigger(victim, opt, dataclasses.replace(cfg.attack, uat_max_sweeps=cap),
                                 forbidden_tokens(tok, victim.embeddings.shape[0]), 42,
                                 tok(" the", add_special_tokens=False)["input_ids"][0])
        assert found["loss"] - found["clean_loss"] == pytest.approx(damage, abs=1e-5)
    assert all(1 <= n <= u["sweeps"][-1] for n in u["sweeps_used"])
    for curve in out["flips"].values():             # more flips allowed never break fewer texts
        success = [c["success"] for c in curve.values()]
        assert success == sorted(success)
    # The recommendation is a valid config (stage 6 would accept it).
    lines = [a for line in r.stdout.splitlines() if line.startswith("recommended: --set") for a in line.split()[1:]]
    assert all(k.startswith("attack.") for k in lines[1::2])
    assert run_script("stage_6_hotflip_attacks", "--work-dir", str(work), *fast_sets(), *lines, "--check").returncode in (0, 1)
    # run_all.sh --local --pilot: stages 0-1 (done: kept), then the pilot alone, as 2 processes sharing the texts;
    # they measure what one process measures.
    env = {**os.environ, "MONO_LOCAL_PROCS": "2"}
    r = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--local", "--pilot", "--pilot-texts", "2",
                        "--work-dir", str(sharded),
                        *fast_sets(), *SMOKE], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the attack pilot is done" in r.stdout and not (sharded / "seed_42" / "flags" / "stage_2_train_baseline.done").exists()
    status = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--status", "--work-dir", str(sharded)],
                            capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and [l.split()[1] for l in status.stdout.splitlines()[2:]] == [
        "stage_0_setup", "stage_1_apply_monotonicity", "attack_pilot"], status.stdout
    two = json.loads((sharded / "seed_42" / "results" / "attack_pilot.json").read_text())
    assert two["processes"] == 2
    _close({**two, "processes": 1}, out)


def _close(a, b) -> None:
    """Equal up to float rounding (nested dicts and lists)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-5)
    else:
        assert a == b


def test_the_pilot_before_stages_0_1_is_one_error_line(tmp_path):
    r = run_script("attack_pilot", "--work-dir", str(tmp_path / "empty"), *fast_sets())
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: [attack_pilot] stage 0 has not run for work dir {tmp_path / 'empty'} (no shared/manifest.json)"]
