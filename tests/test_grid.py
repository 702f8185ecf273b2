"""Ablation grids: run_all.sh --grid runs each monotone variant as its own run, sharing stage 0 and the
baseline arm, and compares them (utils/run/grid.py, utils/results/comparison.py)."""
import json
import math
import os
import shutil
import subprocess

import pytest

from configs.experiment_config import ConfigError
from conftest import FAST, ROOT
from utils.run.grid import BASELINE_OUTPUTS, parse_grid, variants

CONSTRUCTIONS = "monotone.construction=softplus_abs,signed_units,projected"
# Budgets that keep each variant's pipeline to minutes on 2 CPU cores: what is under test is the
# grid's plumbing and each construction's certificate (GCG and lm-eval tasks run in test_stages).
SMALL = FAST + [("recovery_baseline.max_tokens", "30000"), ("recovery_monotone.max_tokens", "30000"),
                ("eval.tasks", ""), ("attack.text_attacks", "hotflip"),
                ("attack.uat_opt_texts", "4"), ("attack.uat_eval_texts", "6"), ("attack.uat_restarts", "1"),
                ("attack.uat_max_sweeps", "1"), ("attack.hotflip_texts", "6"),
                ("attack.hotflip_max_flips", "2")]


def _run_all(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONO_SLURM_")}
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=1800)


def _sets(pairs):
    return [a for k, v in pairs for a in ("--set", f"{k}={v}")]


def test_a_grid_is_every_combination_each_a_valid_config():
    got = variants("tiny", [], [CONSTRUCTIONS, "monotone.init=abs,clip"])
    assert [name for name, _ in got] == [f"construction={c},init={i}" for c in ("softplus_abs", "signed_units",
                                                                               "projected") for i in ("abs", "clip")]
    assert got[2][1] == [("monotone.construction", "signed_units"), ("monotone.init", "abs")]
    with pytest.raises(ConfigError, match="needs monotone.scope=mlp_both"):        # one bad combination
        variants("tiny", [("monotone.scope", "mlp_in")], [CONSTRUCTIONS])


@pytest.mark.parametrize("spec,fragment", [
    ("model.n_layer=1,2", "stage 0 or the baseline arm reads it"),
    ("recovery_baseline.lr=1e-3,1e-4", "stage 0 or the baseline arm reads it"),
    ("seed=1,2", "stage 0 or the baseline arm reads it"),
    ("monotone.construction", "expects KEY=V1,V2"),
    ("monotone.init=abs,abs", "lists a value twice"),
])
def test_a_grid_that_could_not_share_or_is_malformed_is_refused(spec, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_grid([spec])


def test_bad_grid_is_one_error_line_before_anything_runs(tmp_path):
    r = _run_all("--local", "--work-dir", str(tmp_path / "w"), "--grid", "pretrain.lr=1,2")
    errors = [l for l in r.stderr.splitlines() if l.startswith("error")]
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: --grid pretrain.lr"), r.stderr
    assert not (tmp_path / "w" / "shared").exists()


def test_grid_dry_run_submits_shared_stages_once_and_each_variant_after_them(tmp_path):
    r = _run_all("--dry-run", "--work-dir", str(tmp_path), "--seeds", "42,7", "--grid",
                 "monotone.construction=signed_units,projected")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    by_stage = lambda n: [l for l in lines if f"jobs/job_{n}_" in l]  # noqa: E731
    assert len(by_stage(0)) == 1 and len(by_stage(2)) == 2 and len(by_stage(8)) == 1
    for n in (1, 3, 4, 5, 6):
        assert len(by_stage(n)) == 4                     # 2 variants x 2 seeds
    for line in by_stage(4):                             # a variant's measurement waits for the shared baseline
        seed = line.split("--job-name mono-4-s")[1].split("-")[0]
        assert f"afterok:<job_2_s{seed}>:<job_3_s{seed}-v" in line
    v0 = f"{tmp_path}/variants/construction=signed_units"
    assert all(f" {v0} " in l and "--set monotone.construction=signed_units" in l
               for l in by_stage(1) + by_stage(7) if "-v0" in l)
    assert "afterok:<job_7_s42-v0>:<job_7_s42-v1>" in by_stage(8)[0]
    assert not (tmp_path / "variants").exists()          # a dry run creates nothing, links included


@pytest.mark.slow
def test_local_grid_shares_stage_0_and_the_baseline_and_compares_certified_variants(tiny_run, tmp_path):
    # One construction per end-to-end run: softplus_abs in test_stages' pipeline test, signed_units
    # here (a local grid on a finished stage 0), projected in test_slurm's grid on the SLURM cluster.
    work = tmp_path / "work"
    shutil.copytree(tiny_run[1].shared, work / "shared")
    r = _run_all("--local", "--work-dir", str(work), "--seeds", "42", *_sets(SMALL), "--grid",
                 "monotone.construction=signed_units")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skip: stage_0_setup already done" in r.stderr        # read with every flag in one process
    names = ["construction=signed_units"]
    assert sorted(p.name for p in (work / "variants").iterdir()) == sorted(names)
    # One baseline, trained in the main run; every output its stage 2 flag lists is under a linked path.
    flag = json.loads((work / "seed_42" / "flags" / "stage_2_train_baseline.done").read_text())
    for output in flag["outputs"]:
        assert any(f"{output}/".startswith(f"seed_42/{linked}/") for linked in BASELINE_OUTPUTS), output
    assert not (work / "seed_42" / "models" / "monotonic").exists()
    comparison = json.loads((work / "final" / "comparison.json").read_text())
    assert [v["name"] for v in comparison["variants"]] == sorted(names)
    for name in names:
        vdir = work / "variants" / name
        assert (vdir / "shared").is_symlink() and (vdir / "seed_42" / "models" / "baseline").is_symlink()
        assert not (vdir / "seed_42" / "checkpoints" / "baseline").exists()        # never retrained
        certs = [json.loads((vdir / "seed_42" / "results" / f).read_text())
                 for f in ("monotonicity_certificate.json", "monotonicity_certificate_monotonic.json")]
        construction = name.split("=")[1]
        assert all(c["monotone"] and c["construction"] == construction for c in certs)
        # The comparison's numbers are the variant's own records: perplexities from stage 4's file.
        ev = json.loads((vdir / "seed_42" / "results" / "evaluation.json").read_text())["models"]
        row = next(v for v in comparison["variants"] if v["name"] == name)
        assert row["all_certified"] and row["settings"]["construction"] == construction
        assert math.isclose(row["ratio_to_baseline"]["mean"],
                            ev["monotonic"]["perplexity"] / ev["baseline"]["perplexity"], rel_tol=1e-12)
        assert math.isclose(row["baseline"]["perplexity"]["mean"], ev["baseline"]["perplexity"], rel_tol=1e-12)
        hot = json.loads((vdir / "seed_42" / "results" / "hotflip.json").read_text())["models"]["monotonic"]
        assert row["damage"]["hotflip_success_rate"]["n_texts"] == len(hot["examples"])
    md = (work / "final" / "comparison.md").read_text()
    assert all(f"| {n} (seeds 1) |" in md for n in names) and "| baseline (shared) |" in md and "| pretrained (shared) |" in md
    status = _run_all("--status", "--work-dir", str(work))
    assert status.returncode == 0 and status.stdout.count("variant construction=") == 1, status.stdout
    # (A rerun that skips every finished stage: tests/test_slurm.py's grid test.)
