"""The attack pilot on stages 0-1's arms (a smoke run at toy budgets; the tiny preset's own pilot is in
docs/measurement.md): what it measures is what the searches do, and what it recommends is a valid config."""
import dataclasses
import json
import shutil

import pytest
import torch

from conftest import fast_sets, run_script

SMOKE = ["--texts", "1", "--set", "attack.text_len=16", "--set", "attack.min_text_len=8", "--set", "attack.gcg_steps=2",
         "--set", "attack.gcg_search_width=4", "--set", "attack.gcg_top_k=4", "--set", "attack.hotflip_top_k=4"]


def test_the_pilot_measures_each_budget_as_its_own_run_would_and_recommends_valid_settings(stage1_work, tmp_path):
    from conftest import tiny_config
    from utils.attacks import gcg
    from utils.attacks.core import Victim, forbidden_tokens
    from utils.data.tokenization import load_tokenizer
    from utils.measurement import load_arm
    from utils.run.compute import CPU
    from utils.text_attacks import attacked_texts
    from utils.run.run_files import RunPaths
    work = tmp_path / "w"
    shutil.copytree(stage1_work, work)
    r = run_script("attack_pilot", "--work-dir", str(work), *fast_sets(), *SMOKE)
    assert r.returncode == 0, r.stderr[-3000:]
    results = work / "seed_42" / "results"
    out = json.loads((results / "attack_pilot.json").read_text())
    assert (results / "attack_pilot.png").stat().st_size > 0 and "| GCG setting |" in (results / "attack_pilot.md").read_text()
    arms = {"pretrained", "monotonic_init", "control_40000"}
    assert all(set(row["damage"]) == arms for row in out["gcg"].values()) and set(out["flips"]) == arms
    # A GCG run's trace holds every shorter run: the pilot's damage at s steps is a run of s steps, rescored.
    cfg = tiny_config(work, [tuple(kv.split("=", 1)) for kv in SMOKE[3::2]])
    text = attacked_texts(cfg, RunPaths(work, 42), 1)[0]
    tok = load_tokenizer(work / "shared" / "tokenizer")
    victim = Victim(load_arm(work / "seed_42" / "models" / "monotonic_init", "cpu"), CPU, cfg.attack.batch_size)
    row = out["gcg"]["width 8, top-k 16"]
    for s, damage in zip(row["steps"], row["damage"]["monotonic_init"]):
        a = dataclasses.replace(cfg.attack, gcg_steps=s, gcg_search_width=8, gcg_top_k=16)
        rec = gcg.attack_text(victim, text["ids"], a, forbidden_tokens(tok, victim.embeddings.shape[0]),
                              torch.Generator().manual_seed(42 * 100_003 + text["doc"]))
        assert rec["abs_delta_nll"] == pytest.approx(damage, abs=1e-5)
    for curve in out["flips"].values():             # more flips allowed never break fewer texts
        success = [c["success"] for c in curve.values()]
        assert success == sorted(success)
    # The recommendation is a valid config (stage 6 would accept it).
    lines = [a for line in r.stdout.splitlines() if line.startswith("recommended: --set") for a in line.split()[1:]]
    assert all(k.startswith("attack.") for k in lines[1::2])
    assert run_script("stage_6_hotflip_attacks", "--work-dir", str(work), *fast_sets(), *lines, "--check").returncode in (0, 1)
