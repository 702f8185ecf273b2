"""Ablation grids: run_all.sh --grid runs each monotone variant as its own run, sharing stage 0 and the
baseline arm, and compares them (utils/run/grid.py, utils/results/comparison.py)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from configs.experiment_config import ConfigError
from conftest import FAST, ROOT
from utils.run.grid import BASELINE_OUTPUTS, MAIN, baseline_owners, link_variant, parse_grid, variants

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
    ("model.n_layer=1,2", "stage 0 reads it"),
    ("controls.pretrain_snapshots=1000,2000", "stage 0 reads it"),
    ("seed=1,2", "stage 0 reads it"),
    ("monotone.construction", "expects KEY=V1,V2"),
    ("monotone.init=abs,abs", "lists a value twice"),
])
def test_a_grid_that_could_not_share_or_is_malformed_is_refused(spec, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_grid([spec])


def test_a_grid_over_the_baseline_recipe_trains_each_distinct_baseline_once_and_links_the_rest(tmp_path):
    plan = variants("tiny", [], ["recovery_baseline.lr=1e-3,3e-3", "monotone.init=abs,clip"])
    names = [n for n, _ in plan]
    assert baseline_owners(plan) == [names[0], names[0], names[2], names[2]]      # first of each lr owns it
    assert baseline_owners(variants("tiny", [], [CONSTRUCTIONS])) == [MAIN] * 3   # the main run's baseline
    owner, follower = link_variant(tmp_path, names[0], [7], names[0]), link_variant(tmp_path, names[1], [7], names[0])
    assert not (owner / "seed_7" / "models" / "baseline").exists()                   # the owner trains it
    link = follower / "seed_7" / "models" / "baseline"
    assert link.is_symlink() and link.resolve() == (owner / "seed_7" / "models" / "baseline").resolve()
    main = link_variant(tmp_path, "construction=projected", [7])
    assert (main / "seed_7" / "models" / "baseline").resolve() == (tmp_path / "seed_7" / "models" / "baseline").resolve()
    # SLURM: one stage 2 job per distinct baseline (none in the main run), each variant waits for its own.
    r = _run_all("--dry-run", "--work-dir", str(tmp_path / "d"), "--seeds", "42", "--grid", "recovery_baseline.lr=1e-3,3e-3",
                 "--grid", "monotone.init=abs,clip")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    twos = [l for l in lines if "jobs/job_2_" in l]
    assert len(twos) == 2 and all("-v0 " in l or "-v2 " in l for l in twos), twos
    fours = {l.split("--job-name mono-4-s42-")[1].split(" ")[0]: l for l in lines if "jobs/job_4_" in l}
    for v, own in (("v0", "v0"), ("v1", "v0"), ("v2", "v2"), ("v3", "v2")):
        assert f"afterok:<job_2_s42-{own}>:<job_3_s42-{v}>" in fours[v], fours[v]


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
    # benchmarks/first_run_floor.py on the variant: the tokens it counts are the records' (its stage 2 is the
    # linked baseline's training), and its floor (that work at the matmul peak) is below the logged time of every
    # stage the variant ran itself (3-6), as a lower bound must be.
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "first_run_floor.py"), str(vdir),
                        "--json", str(tmp_path / "f.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    floor = json.loads((tmp_path / "f.json").read_text())
    trained = json.loads((vdir / "seed_42" / "results" / "training_baseline.json").read_text())["history"]["tokens"]
    assert floor["stages"]["stage_2"]["training_tokens"] == trained
    hot = json.loads((vdir / "seed_42" / "results" / "hotflip.json").read_text())["models"]
    assert floor["stages"]["stage_6"]["forward_tokens"] >= sum(e["cost"]["forward_tokens"] for m in hot.values()
                                                                for e in m["examples"]) > 0
    assert all(0 < floor["stages"][f"stage_{n}"]["floor_s"] < floor["stages"][f"stage_{n}"]["logged_s"]
               for n in (3, 4, 5, 6)), floor["stages"]


@pytest.mark.slow
def test_variants_measure_the_arms_they_share_once(tiny_run, tmp_path):
    """Stage 4 in two variants linked to one stage 0: the second reads the first's measurement of the
    shared arms (pretrained, the control snapshot) instead of measuring again, and so does another seed (the
    same models on the same test split); another eval config does not."""
    from conftest import run_script
    work = tmp_path / "work"
    shutil.copytree(tiny_run[1].shared, work / "shared")
    sets = [a for k, v in [*FAST, ("eval.tasks", "")] for a in ("--set", f"{k}={v}")]
    runs = {}
    for name, extra in (("a", []), ("b", []), ("c", ["--set", "eval.stride=32"]),
                        ("d", ["--set", "monotone.construction=projected"]), ("s", ["--seed", "43"])):
        seed = 43 if name == "s" else 42
        vdir = link_variant(work, name, [seed])
        r = run_script("stage_4_evaluate", "--work-dir", str(vdir), *sets, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = (r.stdout, json.loads((vdir / f"seed_{seed}" / "results" / "evaluation.json").read_text())["models"])
    assert set(runs["a"][1]) == {"pretrained", "control_40000"}
    assert "measured before: kept" not in runs["a"][0]
    assert runs["b"][0].count("measured before: kept") == 2, runs["b"][0]
    assert runs["b"][1] == runs["a"][1]                                   # the same records, not re-measured
    assert "measured before: kept" not in runs["c"][0]          # another stride: measured afresh
    assert runs["c"][1]["pretrained"]["perplexity"] != runs["a"][1]["pretrained"]["perplexity"]
    # another construction builds other monotone arms, not another pretrained model or control: kept
    assert runs["d"][0].count("measured before: kept") == 2 and runs["d"][1] == runs["a"][1], runs["d"][0]
    assert runs["s"][0].count("measured before: kept") == 2 and runs["s"][1] == runs["a"][1], runs["s"][0]
    kept = sorted(p.name.split("-")[0] for p in (work / "shared" / "measured" / "every_seed" / "stage_4_evaluate").iterdir())
    assert kept == ["control_40000", "control_40000", "pretrained", "pretrained"]   # two eval configs
    # The records are keyed by the weights' content, not their path: a moved work dir reads them all.
    moved = tmp_path / "moved"
    shutil.move(work, moved)
    vdir = link_variant(moved, "e", [42])
    r = run_script("stage_4_evaluate", "--work-dir", str(vdir), *sets)
    assert r.returncode == 0 and r.stdout.count("measured before: kept") == 2, r.stdout + r.stderr[-2000:]
    assert json.loads((vdir / "seed_42" / "results" / "evaluation.json").read_text())["models"] == runs["a"][1]


def test_records_are_keyed_by_the_measurement_code_not_by_other_files(tmp_path):
    """A commit that changes no measurement code (docs, training, SLURM) keeps every saved record; one that
    changes an attack or the perplexity routine measures again."""
    from conftest import ROOT
    from utils.run.run_files import MEASUREMENT_CODE, source_digest
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "work"))
    before = source_digest(root=copy)
    assert before == source_digest()                                              # the same files, another place
    (copy / "README.md").write_text("changed\n")
    (copy / "utils" / "train" / "training.py").write_text((copy / "utils" / "train" / "training.py").read_text() + "\n# c\n")
    assert source_digest(root=copy) == before
    assert "utils/attacks" in MEASUREMENT_CODE and "utils/measure" in MEASUREMENT_CODE
    gcg = copy / "utils" / "attacks" / "gcg.py"
    gcg.write_text(gcg.read_text() + "\n# a change of an attack\n")
    assert source_digest(root=copy) != before


def test_the_comparison_sets_each_variant_beside_its_own_baseline(tmp_path):
    from utils.results.comparison import compare, markdown
    from utils.run.run_files import PipelineError

    def variant(name, lr, base_ppl, mono_ppl):
        vdir = tmp_path / "variants" / name
        res = vdir / "seed_1" / "results"
        res.mkdir(parents=True)
        (res / "monotonicity_certificate.json").write_text(json.dumps({"scope": "mlp_both", "construction": "softplus_abs"}))
        (res / "config_stage_2_train_baseline.json").write_text(json.dumps({"recovery_baseline": {"lr": lr, "max_tokens": 9}}))
        arm = lambda ppl: {"perplexity": {"mean": ppl, "ci95": None}}  # noqa: E731
        final = {"preset": "tiny", "seeds": [1], "partial": False,
                 "per_seed": {"1": {"arms": {"monotonic": {"perplexity": mono_ppl}, "baseline": {"perplexity": base_ppl}},
                                    "certificates": {"monotonic_init": {"monotone": True}, "monotonic": {"monotone": True}}}},
                 "across_seeds": {"arms": {"pretrained": arm(100.0), "monotonic_init": arm(900.0),
                                           "baseline": arm(base_ppl), "monotonic": arm(mono_ppl)}}}
        (vdir / "final").mkdir()
        (vdir / "final" / "final_results.json").write_text(json.dumps(final))

    variant("lr=1e-3,init=abs", 1e-3, 150.0, 180.0)
    variant("lr=1e-3,init=clip", 1e-3, 150.0, 200.0)
    variant("lr=3e-3,init=abs", 3e-3, 140.0, 180.0)
    comp = compare(tmp_path)
    assert [(b["name"], b["variants"]) for b in comp["baselines"]] == [
        ("baseline (lr 0.001)", ["lr=1e-3,init=abs", "lr=1e-3,init=clip"]), ("baseline (lr 0.003)", ["lr=3e-3,init=abs"])]
    ratios = {r["name"]: r["ratio_to_baseline"]["mean"] for r in comp["variants"]}
    assert ratios == pytest.approx({"lr=1e-3,init=abs": 1.2, "lr=1e-3,init=clip": 200 / 150, "lr=3e-3,init=abs": 180 / 140})
    md = markdown(comp)
    assert "| baseline (lr 0.001) (shared) |" in md and "compared with baseline (lr 0.003)" in md
    # The same baseline measured under another code revision (another batching of its windows): one baseline.
    variant("lr=1e-3,init=noise", 1e-3, 150.0 * (1 + 1e-7), 185.0)
    assert [len(b["variants"]) for b in compare(tmp_path)["baselines"]] == [3, 1]
    # Variants of one baseline recipe that disagree on its numbers did not share it: refused.
    variant("lr=1e-3,init=zero", 1e-3, 151.0, 190.0)
    with pytest.raises(PipelineError, match="variants of one recovery_baseline report different baseline perplexities"):
        compare(tmp_path)
