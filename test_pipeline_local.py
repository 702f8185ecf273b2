#!/usr/bin/env python
"""Run every stage on the tiny preset in a temporary directory (a whole pipeline run: several
minutes on 2 cores) and check each stage's outputs and completion flag, then that a rerun
would skip them.

    python test_pipeline_local.py [--work-dir DIR] [--keep] [--set KEY=VALUE ...]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def run(stage: str, work: Path, sets: list[str]) -> str:
    cmd = [sys.executable, str(ROOT / "scripts" / f"{stage}.py"), "--preset", "tiny", "--seed", "42",
           "--work-dir", str(work), *sets]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{stage} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def check_stage_0(work: Path) -> str:
    from utils.data.tokenization import TokenFile
    from utils.model.modeling import load_model
    shared = work / "shared"
    m = json.loads((shared / "manifest.json").read_text())
    assert (shared / "flags" / "stage_0_setup.done").exists(), "no stage 0 flag"
    for split in ("train", "val", "test"):
        assert len(TokenFile(shared / "tokens", split)) == m["corpus"][split]["documents"]
    load_model(work / m["pretrained_path"])        # recorded relative to the work dir
    assert not (shared / "corpus" / "train.jsonl").exists(), "the training split's text is kept as tokens only"
    ppl, uni = m["pretrained_test"]["perplexity"], m["unigram_test_perplexity"]
    assert ppl < 0.7 * uni, f"pretrained perplexity {ppl:.1f} not far below unigram {uni:.1f}"
    return f"test perplexity {ppl:.1f} vs unigram {uni:.1f}"


def check_stage_1(work: Path) -> str:
    from torch.nn.utils import parametrize

    from utils.model.modeling import load_model
    seed = work / "seed_42"
    cert = json.loads((seed / "results" / "monotonicity_certificate.json").read_text())
    assert cert["monotone"] and cert["total_violations"] == 0 and cert["min_weight"] > 0, cert["label"]
    assert not cert["pretrained_reference"]["monotone"]
    model = load_model(seed / "models" / "monotonic_init")
    assert parametrize.is_parametrized(model.gpt_neox.layers[0].mlp.dense_h_to_4h, "weight")
    assert (seed / "flags" / "stage_1_apply_monotonicity.done").exists(), "no stage 1 flag"
    return f"certificate monotone, min weight {cert['min_weight']:.2g}"


def _check_training(work: Path, arm: str, stage: str) -> dict:
    seed = work / "seed_42"
    report = json.loads((seed / "results" / f"training_{arm}.json").read_text())
    assert (seed / "flags" / f"{stage}.done").exists(), f"no {stage} flag"
    assert (seed / "models" / arm / "config.json").exists() and (seed / "models" / f"{arm}_best").exists()
    assert report["history"]["tokens"] >= report["recipe"]["max_tokens"]
    return report


def check_stage_2(work: Path) -> str:
    r = _check_training(work, "baseline", "stage_2_train_baseline")
    return f"val perplexity {r['start_val_perplexity']:.1f} -> {r['final_val_perplexity']:.1f}"


def check_stage_3(work: Path) -> str:
    r = _check_training(work, "monotonic", "stage_3_train_monotonic")
    start, end, mv = r["start_val_perplexity"], r["final_val_perplexity"], r["movement"]
    assert end < 0.5 * start, f"monotone recovery did not recover: {start:.1f} -> {end:.1f}"
    assert mv["fraction_V_changed"] > 0.5, f"constrained weights frozen: {mv['fraction_V_changed']:.1%} of V moved"
    assert r["certificate"]["monotone"], "trained monotone model failed its certificate"
    said = f"val perplexity {start:.1f} -> {end:.1f}, {mv['fraction_V_changed']:.0%} of V moved, still monotone"
    if r["lr_sweep"]:         # the recipe search: every value on the same tokens, the lowest loss chosen
        sw = r["lr_sweep"]
        rows = [x for x in sw["rows"] if x["lr"] in sw["confirmed"]] if sw["confirmed"] else sw["rows"]
        key = "full_val_loss" if sw["confirmed"] else "val_loss"
        assert r["recipe"]["lr"] == min(rows, key=lambda x: x[key])["lr"] == sw["chosen_lr"]
        if sw["confirmed"]:       # the arm is the chosen value's confirming run, gone on from its prefix
            assert r["history"]["val_loss"] == min(x[key] for x in rows)
        said += f"; lr {r['recipe']['lr']:g} chosen of " + ", ".join(f"{x['lr']:g}" for x in sw["rows"]) + \
            (f" (the best {len(rows)} confirmed at full length)" if sw["confirmed"] else "")
    if (work / "seed_42" / "results" / "training_unconstrained_from_init.json").exists():
        from utils.model.modeling import load_model
        from utils.model.monotonicity import certify
        u = _check_training(work, "unconstrained_from_init", "stage_3_train_monotonic")
        assert u["start_val_perplexity"] == start, "the control did not start where the monotone arm started"
        assert "certificate" not in u, "the unconstrained control carries a monotonicity certificate"
        free = load_model(work / "seed_42" / "models" / "unconstrained_from_init")
        cert = certify(free, "mlp_both", trials=8, seed=0)
        assert not cert["monotone"], "the unconstrained control stayed monotone: its constraint was not released"
        said += f"; unconstrained_from_init {u['start_val_perplexity']:.1f} -> {u['final_val_perplexity']:.1f}, not monotone"
    ladder_file = work / "seed_42" / "results" / "ladder.json"
    if ladder_file.exists():       # each rung: the same start, released, its own budget and schedule, the control's lr
        lad = json.loads(ladder_file.read_text())
        target, losses = lad["monotonic_val_loss"], [lad["unconstrained_from_init_val_loss"]]
        assert target == r["history"]["val_loss"] and lad["lr"] == u["recipe"]["lr"]
        for rung in lad["rungs"]:
            t = _check_training(work, rung["arm"], "stage_3_train_monotonic")
            assert t["start_val_perplexity"] == start and "certificate" not in t and t["lr_sweep"] is None
            assert t["recipe"]["lr"] == lad["lr"] and t["recipe"]["max_tokens"] == rung["tokens"]
            assert t["history"]["tokens"] < u["history"]["tokens"] and t["history"]["val_loss"] == rung["val_loss"]
            assert t["history"]["steps"][-1]["lr"] < t["recipe"]["lr"], f"{rung['arm']} did not decay to its own horizon"
            losses.append(rung["val_loss"])
        assert lad["bracketed"] == (min(losses) <= target <= max(losses))
        smallest, largest = lad["rungs"][0], lad["rungs"][-1]      # the extension rule, on the losses it measured
        left = sum(x["added"] for x in lad["rungs"]) < 2                              # controls.ladder_extensions
        assert not (smallest["val_loss"] < target and left and smallest["tokens"] > 1)
        assert not (largest["val_loss"] > target and left and 2 * largest["tokens"] < lad["full_tokens"])
        said += "; ladder " + ", ".join(f"{x['tokens']:,} tokens {x['val_loss']:.3f}" for x in lad["rungs"]) + \
            f" around monotonic {target:.3f}" + ("" if lad["bracketed"] else " (NOT bracketed)")
    return said


TRAINED_ARMS = {"pretrained", "monotonic_init", "baseline", "monotonic"}


def all_arms(work: Path) -> set[str]:
    """The four arms, stage 0's controls (its manifest lists them) and, when stage 3 trained it,
    the unconstrained_from_init control: every one of them measured by stages 4-6."""
    controls = json.loads((work / "shared" / "manifest.json").read_text()).get("controls", {})
    extra = {"unconstrained_from_init"} if (work / "seed_42" / "models" / "unconstrained_from_init").exists() else set()
    ladder = work / "seed_42" / "results" / "ladder.json"
    rungs = {r["arm"] for r in json.loads(ladder.read_text())["rungs"]} if ladder.exists() else set()
    return TRAINED_ARMS | set(controls) | extra | rungs


def _results(work: Path, name: str, stage: str) -> dict:
    seed = work / "seed_42"
    assert (seed / "flags" / f"{stage}.done").exists(), f"no {stage} flag"
    return json.loads((seed / "results" / f"{name}.json").read_text())


def check_stage_4(work: Path) -> str:
    ALL_ARMS = all_arms(work)
    ev = _results(work, "evaluation", "stage_4_evaluate")["models"]
    assert set(ev) == ALL_ARMS, f"evaluated arms {sorted(ev)}"
    assert ev["monotonic"]["perplexity"] < 0.5 * ev["monotonic_init"]["perplexity"]
    return ", ".join(f"{a} {ev[a]['perplexity']:.1f}" for a in sorted(ALL_ARMS))


def check_stage_5(work: Path) -> str:
    ALL_ARMS = all_arms(work)
    u = _results(work, "uat", "stage_5_uat_attacks")
    assert set(u["models"]) == ALL_ARMS and set(u["transfer"]) == ALL_ARMS
    return ", ".join(f"{a} {100 * u['models'][a]['eval']['rel_delta_nll']:+.1f}%" for a in sorted(ALL_ARMS))


def check_stage_6(work: Path) -> str:
    said, ALL_ARMS = [], all_arms(work)
    for name in ("hotflip", "gcg", "random_search"):
        res = _results(work, name, "stage_6_hotflip_attacks")["models"]
        assert set(res) == ALL_ARMS
        for arm, m in res.items():
            assert m["summary"]["mean_abs_delta_nll"] > m["random_control"]["mean_abs_delta_nll"], \
                f"{arm}: {name} did no more damage than random flips"
        said.append(f"{name}: " + ", ".join(f"{a} {100 * res[a]['summary']['success_rate']:.0f}% "
                                            f"(dNLL {res[a]['summary']['mean_abs_delta_nll']:+.2f} vs random "
                                            f"{res[a]['random_control']['mean_abs_delta_nll']:+.2f})"
                                            for a in sorted(ALL_ARMS)))
    worst = _results(work, "worst_case", "stage_6_hotflip_attacks")["models"]
    assert set(worst) == ALL_ARMS
    for arm, m in worst.items():        # the worst case per text is at least every search's damage on it
        for name in ("hotflip", "gcg", "random_search"):                # the worst case's searches, every arm
            recs = {r["doc"]: r["abs_delta_nll"] for r in _results(work, name, "stage_6_hotflip_attacks")["models"][arm]["examples"]}
            assert all(w["abs_delta_nll"] >= recs[w["doc"]] for w in m["examples"]), (arm, name)
        act = json.loads((work / m["path"] / "config.json").read_text())["hidden_act"]
        assert m["flat_region"]["clean"]["flat_region"] == (act == "monotone_gelu"), arm
    pgd = _results(work, "pgd", "stage_6_hotflip_attacks")["models"]
    assert set(pgd) == ALL_ARMS and all((work / m["deltas_file"]).is_file() for m in pgd.values())
    said.append("worst case: " + ", ".join(f"{a} dNLL {worst[a]['summary']['mean_abs_delta_nll']:+.2f}" for a in sorted(ALL_ARMS)))
    return "; ".join(said)


def check_stage_7(work: Path) -> str:
    final = json.loads((work / "final" / "final_results.json").read_text())
    assert final["seeds"] == [42] and not final["partial"]
    assert set(final["across_seeds"]["arms"]) == all_arms(work)
    for name in ("results.md", "table.tex", "matched_control.json", "training_curves.png", "perplexity.png",
                 "hotflip_delta_nll.png", "gcg_delta_nll.png", "uat_transfer.png", "robustness_vs_clean_loss.png",
                 "success_vs_threshold.png", "attack_convergence.png"):
        assert (work / "final" / name).stat().st_size > 0, name
    fr = final["across_seeds"]["frontier"]
    md = (work / "final" / "results.md").read_text()
    swept = any(t.get("lr_sweep") for t in final["per_seed"]["42"]["training"].values())
    assert ("## Recipe search" in md) == swept, "the recipe search's table is missing from results.md"
    assert md.index("## Matched-control verdict") < md.index("## Worst case per text") < md.index("## Every arm") \
        < md.index("## Every pair of arms")
    for section in ("## Convergence", "## Gradient masking checks", "## PGD on the input embeddings", "## UAT restarts"):
        assert section in md, f"results.md has no {section!r}"
    said = [f"{m}: {arm} residual {r['mean']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
            for m, f in fr.items() for arm, r in f["residuals"].items() if arm == "monotonic"]
    assert said, "no frontier residual for the monotone arm"
    if (work / "seed_42" / "results" / "ladder.json").exists():     # the verdict's frontier: the same history's arms
        same = {a for a in all_arms(work) if a.startswith("ladder_")} | {"baseline", "unconstrained_from_init"}
        assert all(set(f["unconstrained_arms"]) == same for f in fr.values()), fr[next(iter(fr))]["unconstrained_arms"]
        assert "Ladder (stage 3;" in md
    return "results.md, matched_control.json and the plots written; " + "; ".join(said[:2])


STAGES = [("stage_0_setup", check_stage_0), ("stage_1_apply_monotonicity", check_stage_1),
          ("stage_2_train_baseline", check_stage_2), ("stage_3_train_monotonic", check_stage_3),
          ("stage_4_evaluate", check_stage_4), ("stage_5_uat_attacks", check_stage_5),
          ("stage_6_hotflip_attacks", check_stage_6), ("stage_7_aggregate", check_stage_7)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    import utils  # noqa: F401
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mono_pipeline_"))
    sets = [a for kv in args.sets for a in ("--set", kv)]
    failed = False
    for stage, check in STAGES:
        try:
            run(stage, work, sets)
            print(f"PASS  {stage}: {check(work)}")
        except AssertionError as e:
            print(f"FAIL  {stage}: {e}")
            failed = True
            break
    if not failed:      # a rerun skips stages 0-6 (stage 7 always re-aggregates): their flags match
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "stages_done.py"), "--preset", "tiny",
                               "--work-dir", str(work), *sets, "--seeds", "42"], capture_output=True, text=True)
        if done.returncode != 0 or done.stdout.splitlines() != [f"{i} 42" for i in range(len(STAGES) - 1)]:
            print(f"FAIL  a rerun would not skip every completed stage: stages_done printed {done.stdout!r} "
                  f"{done.stderr[-500:]}")
            failed = True
        else:
            print("PASS  rerun skips every completed stage")
    if not args.keep and not args.work_dir:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
        print(f"temporary work dir {work} removed (--keep keeps it)")
    else:
        print(f"outputs kept in {work} (report: {work / 'final' / 'results.md'})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
