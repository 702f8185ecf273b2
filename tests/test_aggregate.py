"""Stage 7: statistics against known values, partial inputs, LaTeX and plots."""
import json
import math
import re

import numpy as np
import matplotlib
import pytest

from utils.text_attacks import worst_of
from utils.results.aggregate import run_aggregate
from utils.results.statistics import bootstrap_interval, holm, mcnemar_exact, mde, t_interval, wilcoxon_paired
from utils.run.run_files import PipelineError


def test_t_interval_by_hand():
    r = t_interval([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["std"] == pytest.approx(1.0)
    half = 4.302652729911275 / math.sqrt(3)          # t(0.975, df=2)
    assert r["ci95"] == pytest.approx([2 - half, 2 + half])
    assert t_interval([5.0]) == {"n": 1, "mean": 5.0, "std": None, "ci95": None}


def test_bootstrap_interval_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(123)
    hits = 0
    for rep in range(200):
        lo, hi = bootstrap_interval(rng.normal(5.0, 1.0, 40), n_boot=500, seed=rep)
        hits += lo <= 5.0 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_mcnemar_on_a_hand_computed_table():
    a = [True] * 8 + [False] * 2 + [True] * 5 + [False] * 5     # 8 only-a, 2 only-b, 5 both, 5 neither
    b = [False] * 8 + [True] * 2 + [True] * 5 + [False] * 5
    r = mcnemar_exact(a, b)
    assert (r["only_first"], r["only_second"]) == (8, 2)
    assert r["p_value"] == pytest.approx(112 / 1024)            # 2 * P(X <= 2), X ~ Bin(10, 1/2)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0


def test_wilcoxon_exact_small_sample():
    r = wilcoxon_paired([2, 3, 4, 5, 6], [1, 1, 1, 1, 1])       # all 5 differences positive
    assert r["p_value"] == pytest.approx(2 / 32) and r["mean_difference"] == 3.0
    assert wilcoxon_paired([1, 2], [1, 2])["p_value"] == 1.0


# -- hand-made per-example records for two seeds -------------------------------

ARMS = ("pretrained", "monotonic_init", "baseline", "monotonic")


def _write_seed(work, seed, success, skip=()):
    """Records where arm a succeeds on the docs listed in success[a] (of 10), dNLL 0.5 or 0.05."""
    res = work / f"seed_{seed}" / "results"
    res.mkdir(parents=True)
    files = {
        "monotonicity_certificate.json": {"monotone": True, "scope": "mlp_both", "total_violations": 0, "min_weight": 1e-6},
        "monotonicity_certificate_monotonic.json": {"monotone": True, "scope": "mlp_both", "total_violations": 0,
                                                    "min_weight": 1e-4},
        "evaluation.json": {"models": {a: {"label": "x", "perplexity": math.exp(2.0 + i),
                                           "bits_per_byte": 1.0,
                                           "per_document": {"nll": [(2.0 + i) * 10 + d - 2 for d in range(5)],
                                                            "tokens": [10] * 5}}
                                       for i, a in enumerate(ARMS)}},
        "hotflip.json": {"success_threshold": 0.15, "transfer": {a: {b: {"success_rate": 0.5} for b in ARMS} for a in ARMS},
                         "models": {a: {"label": "x", "random_control": {"mean_abs_delta_nll": 0.01, "success_rate": 0.0},
                                        "examples": [{"doc": d, "success": d in success[a],
                                                      "abs_delta_nll": 0.5 if d in success[a] else 0.05,
                                                      "rel_delta_nll": 0.2 if d in success[a] else 0.02,
                                                      "clean_nll": 2.5} for d in range(10)]} for a in ARMS}},
        # GCG (same threat model): every arm also falls on doc 9; 500 exact forward passes per text.
        "gcg.json": {"success_threshold": 0.15, "transfer": {a: {b: {"success_rate": 0.6} for b in ARMS} for a in ARMS},
                     "models": {a: {"label": "x", "examples": [
                         {"doc": d, "success": d in success[a] or d == 9,
                          "abs_delta_nll": 0.6 if d in success[a] or d == 9 else 0.06,
                          "rel_delta_nll": 0.25 if d in success[a] or d == 9 else 0.03, "clean_nll": 2.5,
                          "cost": {"forward_passes": 500, "forward_tokens": 500 * 65, "gradient_passes": 10,
                                   "gradient_tokens": 650}} for d in range(10)]} for a in ARMS}},
        "uat.json": {"transfer": {a: {b: {"rel_delta_nll": 0.1} for b in ARMS} for a in ARMS},
                     "models": {a: {"trigger_text": "t", "eval": {"abs_delta_nll": 0.3, "rel_delta_nll": 0.1},
                                    "examples": [{"doc": d, "clean_nll": 3.0, "triggered_nll": 3.3} for d in range(10)],
                                    # two restarts: held-out damage 0.3 (the reported trigger) and 0.1; traces plateau
                                    "restarts": [{"restart": r, "eval": {"abs_delta_nll": v},
                                                  "trace": [[1, 0.0], [100, v], [200, v]]}
                                                 for r, v in ((0, 0.3), (1, 0.1))]}
                                for a in ARMS}},
    }
    # Convergence traces: HotFlip and GCG gain half their damage in the second half of the budget; GCG has
    # not plateaued, HotFlip's flips are the threat model (no plateau to reach, no flag).
    for r in [r for a in ARMS for r in files["hotflip.json"]["models"][a]["examples"]]:
        r["trace"] = [[1, 0.0], [50, r["abs_delta_nll"] / 2], [100, r["abs_delta_nll"]]]
    for a in ARMS:
        for r in files["gcg.json"]["models"][a]["examples"]:
            r["trace"] = [[1, 0.0], [250, r["abs_delta_nll"] / 2], [500, r["abs_delta_nll"]]]
    # The surrogate finds 0.1 more on the constrained arms (their own gradient hid it); random search 0.01.
    files["gcg_surrogate.json"] = {"success_threshold": 0.15, "models": {a: {"label": "x", "examples": [
        {**r, "abs_delta_nll": r["abs_delta_nll"] + (0.1 if a.startswith("monotonic") else 0.0)}
        for r in files["gcg.json"]["models"][a]["examples"]]} for a in ARMS}}
    files["random_search.json"] = {"success_threshold": 0.15, "models": {a: {"label": "x", "examples": [
        {**r, "abs_delta_nll": 0.01, "success": False, "rel_delta_nll": 0.004}
        for r in files["gcg.json"]["models"][a]["examples"]]} for a in ARMS}}
    for name in ("hotflip", "gcg", "gcg_surrogate", "random_search"):
        for m in files[f"{name}.json"]["models"].values():
            for r in m["examples"]:
                r.update(success_abs=r["abs_delta_nll"] > 0.5, attacked_nll=2.5 + r["abs_delta_nll"], n_flips=1,
                         original_ids=[0], adversarial_ids=[0], modified_positions=[])
    done = {n: files[f"{n}.json"]["models"] for n in ("hotflip", "gcg", "gcg_surrogate", "random_search")}
    files["worst_case.json"] = {"success_threshold": 0.15, "models": {a: {"label": "x",
        "examples": worst_of(done, a), "won_by": {n: sum(w["attack"] == n for w in worst_of(done, a)) for n in done},
        "flat_region": {k: {"flat_region": a.startswith("monotonic"), "mean": 0.001 if a.startswith("monotonic") else 0.2,
                            "fraction_below_clamp": [0.001, 0.001] if a.startswith("monotonic") else [0.1, 0.3]}
                        for k in ("clean", "adversarial")}} for a in ARMS}}
    for arm in ("baseline", "monotonic"):
        files[f"training_{arm}.json"] = {
            "history": {"tokens": 1000, "val_loss": 5.0, "best_val_loss": 5.0,
                        "steps": [{"tokens": 0, "val_loss": 7.0}, {"tokens": 1000, "val_loss": 5.0}]},
            "start_val_perplexity": math.exp(7), "final_val_perplexity": math.exp(5),
            "movement": {"fraction_V_changed": 0.9 if arm == "monotonic" else None,
                         "groups": {"mlp_in": {"relative_delta": (0.02 + 0.02 * (seed == 2)) if arm == "monotonic"
                                               else 0.4},
                                    "attention": {"relative_delta": 0.5 if arm == "monotonic" else 0.3}}}}
    correct = {"pretrained": 8, "monotonic_init": 2, "baseline": 7, "monotonic": 4}   # of 10 examples
    files["capabilities.json"] = {"harness": "lm-evaluation-harness 0.4.13", "models": {a: {"tasks": {"heldout_cloze": {
        "metrics": {"acc": k / 10, "acc_stderr": 0.1}, "n": 10, "correct": [float(i < k) for i in range(10)]}}}
        for a, k in correct.items()}}
    for name, obj in files.items():
        if name not in skip:
            (res / name).write_text(json.dumps(obj))


def _work(tmp_path, skip=()):
    _write_seed(tmp_path, 1, {"pretrained": {0, 1}, "monotonic_init": set(range(9)), "baseline": set(range(6)),
                              "monotonic": {0, 1}})
    _write_seed(tmp_path, 2, {"pretrained": {0}, "monotonic_init": set(range(8)), "baseline": set(range(8)),
                              "monotonic": {0, 1, 2}}, skip=skip)
    return tmp_path


def test_aggregate_two_seeds_numbers_tables_and_plots(tmp_path, capsys):
    outputs = run_aggregate(_work(tmp_path), None, False, "tiny")
    final = json.loads((tmp_path / "final" / "final_results.json").read_text())
    acr = final["across_seeds"]
    base = acr["arms"]["baseline"]["hotflip_success_rate"]
    assert base["mean"] == pytest.approx(0.7) and base["n"] == 2 and base["n_texts"] == 20   # 6/10 and 8/10
    assert base["interval"].startswith("hierarchical bootstrap") and 0.3 < base["ci95"][0] < 0.7 < base["ci95"][1] <= 1
    mono_init = acr["arms"]["monotonic_init"]["hotflip_success_rate"]      # 9/10 and 8/10: t over seeds would
    assert 0 < mono_init["ci95"][0] < mono_init["ci95"][1] <= 1            # run past 1; a resampled mean does not
    assert acr["arms"]["monotonic"]["hotflip_success_rate"]["mean"] == pytest.approx(0.25)
    diff = acr["monotonic_minus_baseline"]["hotflip_success_rate"]
    assert diff["mean"] == pytest.approx(-0.45)
    t = final["per_seed"]["1"]["tests"]["hotflip_success"]
    assert (t["only_first"], t["only_second"]) == (4, 0) and t["p_value"] == pytest.approx(2 / 16)
    # Every pair of the 4 arms on 7 measures (the worst case's dNLL and success first), paired text by text.
    tests = acr["tests"]
    assert len(tests) == 42 and "hotflip_success: pretrained vs monotonic" in tests
    pair = tests["hotflip_success: baseline vs monotonic"]
    assert pair["mean"] == pytest.approx(0.45) and pair["n"] == 2 and pair["n_texts"] == 20   # (0.4 + 0.5) / 2
    assert pair["ci95"][0] >= 0 and pair["p_value"] < 0.05          # no text where only the monotone arm fell
    # Holm over the report's 42 tests: the smallest p times 42 (capped at 1), then non-decreasing.
    p = {k: t["p_value"] for k, t in tests.items()}
    smallest = min(p, key=p.get)
    assert tests[smallest]["p_holm"] == pytest.approx(min(1, 42 * p[smallest]))
    assert pair["mde80"] == pytest.approx(mde(pair["se"], 0.05 / 42)) and pair["mde_alpha"] == pytest.approx(0.05 / 42)
    # The primary endpoint over two seeds: a seed-level t over the seeds' residuals from their own frontiers.
    primary = acr["frontier"]["worst_abs_delta_nll"]["residuals"]["monotonic"]
    assert primary["seed_level"]["n"] == 2 and primary["seed_level"]["test"] == "one-sample t over seeds"
    assert acr["primary"]["verdict"] == primary["verdict"] and "p_holm" not in primary
    assert f"Holm-adjusted over 42 tests p = {tests[smallest]['p_holm']:.3g}" in acr["more_robust"][smallest]
    quiet = [v for v in acr["more_robust"].values() if v.startswith("no significant difference")]
    assert quiet and all("detectable at 80% power: " in v for v in quiet)
    # GCG: its own rates (HotFlip's successes plus doc 9) and its own paired tests on the same texts.
    assert acr["arms"]["baseline"]["gcg_success_rate"]["mean"] == pytest.approx(0.8)       # 7/10 and 9/10
    assert acr["arms"]["monotonic"]["gcg_success_rate"]["mean"] == pytest.approx(0.35)     # 3/10 and 4/10
    assert tests["gcg_success: baseline vs monotonic"]["mean"] == pytest.approx(0.45)
    assert final["per_seed"]["1"]["arms"]["baseline"]["gcg_forward_passes_per_text"] == 500
    # UAT: equal damage in both seeds is no difference, by the bootstrap and by the seed-level t-test.
    uat = tests["uat_abs_delta_nll: baseline vs monotonic"]
    assert uat["mean"] == pytest.approx(0.0) and uat["seed_level"]["p_value"] == 1.0
    assert acr["more_robust"]["uat_abs_delta_nll: baseline vs monotonic"].startswith("no test: the measure does not vary")
    # No unconstrained arm of another clean loss: the frontier needs two unconstrained arms, here pretrained and
    # baseline, whose clean NLLs are equal (2.5): one point of clean loss, the monotone residual still defined.
    assert set(acr["frontier"]["hotflip_abs_delta_nll"]["residuals"]) == {"monotonic_init", "monotonic"}
    # Shared arms: one model for every seed; their interval comes from the documents, not zero width.
    shared = acr["arms"]["pretrained"]["perplexity"]
    assert acr["arms"]["pretrained"]["shared"] and shared["ci95"][0] < shared["mean"] < shared["ci95"][1]
    assert final["per_seed"]["1"]["arms"]["pretrained"]["perplexity"] == pytest.approx(math.exp(2))
    assert not final["partial"] and final["per_seed"]["2"]["certificates"]["monotonic"]["monotone"]
    md = (tmp_path / "final" / "results.md").read_text()
    assert "n = 2 seed(s); per seed 5 test documents (perplexity), 10 HotFlip texts, 10 GCG texts, 10 UAT evaluation texts" in md
    assert "## Attack compute" in md and "| Baseline (recovered) | 500 |" in md     # GCG's forward passes per text
    assert "Preset `tiny`." in md and "Pretrained *" in md
    # What recovery changed, per module group: mean over seeds of each arm's relative change.
    assert "| mlp_in | 40.00% | 3.00% |" in md and "| attention | 30.00% | 50.00% |" in md
    # Capabilities: accuracy per task and arm; baseline vs monotone on the same examples of both seeds.
    cap = acr["capabilities"]["heldout_cloze"]
    assert cap["arms"]["baseline"]["mean"] == pytest.approx(0.7) and cap["arms"]["monotonic"]["n"] == 2
    assert (cap["test"]["only_first"], cap["test"]["only_second"], cap["test"]["n"]) == (6, 0, 20)
    assert cap["test"]["p_value"] == pytest.approx(2 / 2**6)
    assert "## Capabilities (zero-shot accuracy, lm-evaluation-harness 0.4.13" in md
    assert "| heldout_cloze | 80.0% [80.0, 80.0] | 20.0% [20.0, 20.0] | 70.0% [70.0, 70.0] | 40.0% [40.0, 40.0] | " \
           "p = 0.0312 (baseline-only 6, monotone-only 0, n = 20) |" in md
    # table.tex is a fragment to \input; table_standalone.tex compiles on its own.
    tex = (tmp_path / "final" / "table.tex").read_text()
    assert r"\documentclass" not in tex and r"\begin{document}" not in tex and tex.count(r"\begin{tabular}") == 2
    assert r"heldout\_cloze & 80.0" in tex                          # the capability table
    standalone = (tmp_path / "final" / "table_standalone.tex").read_text()
    assert standalone.startswith(r"\documentclass") and r"\usepackage{booktabs}" in standalone
    body = tex[tex.index(r"\midrule"):tex.index(r"\bottomrule")]
    for t in (tex, standalone):
        assert t.count("{") == t.count("}") and t.count(r"\begin{") == t.count(r"\end{")
        assert all(r in t for r in (r"\toprule", r"\midrule", r"\bottomrule"))
    rows = [l for l in body.splitlines() if l.endswith(r"\\")]
    assert len(rows) == 4 and all(len(re.findall(r"(?<!\\)&", r)) == 7 for r in rows)
    # Intervals as [lo, hi] (Wilson and bootstrap ones are not symmetric), each column's kind in the caption.
    assert r"\pm" not in tex
    for row in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)&", row.rstrip("\\ "))]
        for i in (2, 4):                                                   # HotFlip and GCG success
            lo, hi = map(float, re.fullmatch(r"[\d.]+\\% \[([\d.]+), ([\d.]+)\]", cells[i]).groups())
            assert 0 <= lo <= float(cells[i].split("\\%")[0]) <= hi <= 100
    assert "hierarchical bootstrap interval (seeds, then texts" in tex and "bootstrap over documents" in tex \
        and "t interval over the 2 seeds" in tex
    for png in [p for p in outputs if p.endswith(".png")]:
        data = open(png, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # with gcg_delta_nll.png, robustness_vs_clean_loss.png, robustness_all_measures.png, success_vs_threshold.png
    # and attack_convergence.png
    assert len([p for p in outputs if p.endswith(".png")]) == 9
    # Attack strength. The worst case per text over HotFlip, GCG and random search for every arm: the surrogate's
    # larger damage on the constrained arms is the masking check, not a search of the worst case.
    assert acr["worst_won_by"]["monotonic"] == {"hotflip": 0, "gcg": 20, "gcg_surrogate": 0, "random_search": 0}
    assert acr["worst_won_by"]["baseline"]["gcg"] == 20
    assert acr["arms"]["monotonic"]["worst_mean_abs_delta_nll"]["mean"] == pytest.approx(0.06 + 0.54 * 0.35)   # GCG's
    m = acr["masking"]
    assert m["monotonic"]["surrogate_minus_gcg"]["mean"] == pytest.approx(0.1) and m["monotonic"]["flat_region"]
    assert m["baseline"]["surrogate_minus_gcg"]["mean"] == pytest.approx(0.0)
    assert m["baseline"]["below_clamp_clean"] == pytest.approx(0.2) and m["baseline"]["below_clamp_per_layer"] == [0.1, 0.3]
    assert m["monotonic"]["random_minus_gcg"]["ci95"][1] < 0          # the gradient guided GCG
    # GCG dNLL 0.06 + 0.54 x (texts won)/10: monotonic_init 0.573, baseline 0.492, monotonic 0.249, pretrained
    # 0.195; the surrogate's +0.1 on the constrained arms moves none past another.
    rank = acr["surrogate_ranking"]
    assert rank["order"]["gcg_mean_abs_delta_nll"] == ["monotonic_init", "baseline", "monotonic", "pretrained"]
    assert rank["order"]["gcg_surrogate_mean_abs_delta_nll"] == rank["order"]["gcg_mean_abs_delta_nll"] and not rank["changed"]
    assert ("Arms by GCG dNLL, most damaged first: Monotone (init), Baseline (recovered), Monotone (recovered), "
            "Pretrained. Through the surrogate: the same order.") in md
    conv = acr["convergence"]
    assert conv["hotflip"]["arms"]["baseline"]["plateaued"] is None       # its flips are the threat model
    assert conv["gcg"]["arms"]["baseline"]["plateaued"] is False
    assert conv["gcg"]["arms"]["baseline"]["relative_gain_last_half"] == pytest.approx(1.0)
    assert conv["uat"]["arms"]["baseline"]["plateaued"] and conv["uat"]["unit"] == "restart"
    assert "| yes (4 of 4 restarts stopped) |" in md               # each restart's last sweep gained nothing
    r = acr["uat_restarts"]["monotonic"]
    assert (r["mean"], r["min"], r["max"], r["restarts"]) == (pytest.approx(0.2), 0.1, 0.3, 4)
    assert "## Convergence" in md and "| GCG | Baseline (recovered) | 500 |" in md
    assert conv["hotflip"]["arms"]["baseline"]["relative_gain_last_half"] == pytest.approx(1.0)
    assert "| HotFlip | Baseline (recovered) | 100 | 0.182 | +0.182" in md       # half of (0.32 + 0.41) / 2 and "| n/a (flips: the threat model) | n/a |" in md
    flagged = [l for l in md.splitlines() if "(before the plateau: GCG on" in l]
    assert {l.split("|")[1].strip().split(" ")[0] for l in flagged} == {"gcg_abs_delta_nll", "gcg_success", "worst_abs_delta_nll",
                                                                     "worst_success"}
    # The matched-control table marks its GCG and worst-case rows and says why once, under the table.
    marked = {l.split("|")[1].strip().split(" ")[0] for l in md.splitlines() if l.startswith("| ") and
              re.search(r"[¹²³⁴⁵⁶⁷⁸⁹] \|", l)}
    assert marked == {"GCG", "Worst-case", "Random"}
    notes = [l for l in md.splitlines() if re.match(r"[¹²³⁴⁵⁶⁷⁸⁹] before the plateau: GCG on", l)]
    assert len(notes) == 2 and "Random search on" in notes[0] and "Random" not in notes[1]    # worst case; GCG
    assert not any("before the plateau" in l for l in md.splitlines() if l.startswith("| hotflip_"))
    assert "report:" in capsys.readouterr().out


def test_missing_stage_is_named_and_partial_only_when_asked(tmp_path):
    work = _work(tmp_path, skip=("hotflip.json",))
    with pytest.raises(PipelineError, match=r"seed 2: hotflip.json \(stage 6\)"):
        run_aggregate(work, None, False, "tiny")
    assert not (work / "final" / "final_results.json").exists()
    run_aggregate(work, [1, 2], True, "tiny")
    final = json.loads((work / "final" / "final_results.json").read_text())
    assert final["partial"] and final["missing"] == {"2": ["hotflip.json (stage 6)"]}
    assert final["across_seeds"]["arms"]["baseline"]["hotflip_success_rate"]["n"] == 1
    assert "PARTIAL" in (work / "final" / "results.md").read_text()
    assert "PARTIAL" in (work / "final" / "table.tex").read_text()


def test_plots_show_points_for_perplexity_and_both_losses_by_arm(tmp_path):
    from matplotlib.container import ErrorbarContainer
    from matplotlib.patches import Rectangle

    from utils.results.plots import damage_figure, perplexity_figure, training_figure, uat_figure
    run_aggregate(_work(tmp_path), None, False, "tiny")
    final = json.loads((tmp_path / "final" / "final_results.json").read_text())
    for seed in final["per_seed"].values():               # the hand-made records have no train loss: add some
        for arm in ("baseline", "monotonic"):
            seed["training"][arm]["train_curve"] = [[100, 6.5], [1000, 5.2]]
    every, zoomed = perplexity_figure(final).axes
    assert every.get_yscale() == "log" and zoomed.get_yscale() == "linear"
    for ax in (every, zoomed):
        assert not [p for p in ax.patches if isinstance(p, Rectangle)]               # no bars
    # One point + interval per model, labelled with its own interval's kind; the linear panel leaves out
    # the monotone init, so the other models' differences are not flattened.
    kinds = {c.get_label() for c in every.containers if isinstance(c, ErrorbarContainer)}
    assert [t.get_text() for t in zoomed.get_xticklabels()] == ["Pretrained", "Baseline (recovered)",
                                                                 "Monotone (recovered)"]
    assert sum(isinstance(c, ErrorbarContainer) for c in every.containers) == 4
    assert kinds == {"mean; 95% interval: bootstrap over documents (the same model for every seed)",
                     "mean; 95% interval: t interval over 2 seeds"}
    assert kinds <= {t.get_text() for t in every.get_legend().get_texts()}
    lines = training_figure(final).axes[0].get_lines()
    colour = {l.get_label(): l.get_color() for l in lines if not l.get_label().startswith("_")}
    assert set(colour) == {"baseline, train", "baseline, validation", "monotonic, train", "monotonic, validation"}
    assert colour["baseline, train"] == colour["baseline, validation"] != colour["monotonic, validation"]
    # Box plots name their markers and give n per model.
    box = damage_figure(final, "hotflip", "HotFlip").axes[0]
    assert [t.get_text() for t in box.get_legend().get_texts()] == ["median", "mean"]
    n = {arm: sum(len(s["arms"][arm]["hotflip_abs_deltas"]) for s in final["per_seed"].values())
         for arm in ("pretrained", "baseline")}
    labels = [t.get_text() for t in box.get_xticklabels()]
    assert f"Pretrained\nn = {n['pretrained']}" in labels and f"Baseline (recovered)\nn = {n['baseline']}" in labels
    # The UAT colour scale spans the cells without the monotone init, whose damage is far larger.
    arms = ["pretrained", "monotonic_init", "baseline", "monotonic"]
    for seed in final["per_seed"].values():
        seed["transfer"]["uat_rel_delta_nll"] = {
            src: {dst: 0.4 if "monotonic_init" in (src, dst) else 0.01 * (i + j + 1) for j, dst in enumerate(arms)}
            for i, src in enumerate(arms)}
    image = uat_figure(final).axes[0].images[0]
    assert image.norm.vmax == pytest.approx(7.0) and image.get_array()[1][1] == pytest.approx(40.0)


@pytest.fixture
def read_only(tmp_path):
    """A finished run's work dir (records of two seeds, aggregated once), mounted read-only at a second path."""
    import os
    import subprocess
    work = _work(tmp_path / "w")
    run_aggregate(work, [1, 2], False, "tiny")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", str(work), str(mnt)], capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("cannot bind-mount (CI runs as root)")
        pytest.skip("needs root to mount a read-only work dir")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_read_only_work_dir_is_one_error_line_and_keeps_every_output(read_only):
    import subprocess
    import sys

    from conftest import ROOT
    before = {p: p.read_bytes() for p in (read_only / "final").rglob("*") if p.is_file()}
    for cmd in ([sys.executable, str(ROOT / "scripts" / "stage_7_aggregate.py"), "--work-dir", str(read_only),
                 "--seeds", "1,2"],
                ["bash", str(ROOT / "run_all.sh"), "--local", "--work-dir", str(read_only), "--seeds", "1,2"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        lines = (r.stdout + r.stderr).strip().splitlines()
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert [l for l in r.stderr.splitlines() if l.startswith("error:")] == [r.stderr.strip().splitlines()[-1]]
        assert "read-only" in r.stderr.lower() and "copy it somewhere writable" in r.stderr, lines
    assert {p: p.read_bytes() for p in (read_only / "final").rglob("*") if p.is_file()} == before


def test_holm_adjusts_by_hand_computed_values():
    # Sorted: a .01 x 3 = .03; c .03 x 2 = .06; b .04 x 1 = .04, kept non-decreasing: .06.
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    # a .6 x 2 = 1.2, capped at 1; d .7 x 1, kept non-decreasing: 1.
    assert holm({"a": 0.6, "d": 0.7}) == pytest.approx({"a": 1.0, "d": 1.0})
    assert holm({}) == {}


def test_the_console_summary_leads_with_the_primary_verdict_and_fits_one_screen(tmp_path, capsys):
    run_aggregate(_work(tmp_path), [1], False, "tiny")                # one seed
    lines = capsys.readouterr().out.splitlines()
    final = json.loads((tmp_path / "final" / "final_results.json").read_text())
    r = final["across_seeds"]["frontier"]["worst_abs_delta_nll"]["residuals"]["monotonic"]
    assert len(lines) <= 25 and max(map(len, lines)) <= 120, lines
    assert lines[1] == "PRIMARY  Monotone (recovered) minus the unconstrained frontier, Worst-case dNLL (HotFlip, GCG, random search):"
    # One seed: the estimate with its texts-only interval, and no verdict (the primary test's unit is the seed).
    assert lines[2].strip() == (f"{r['mean']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] (1 seed x 10 texts; "
                                "interval over texts only): no verdict (1 seed)")
    rows = {l.split("  ")[0].rstrip("†"): l for l in lines[4:] if not l.startswith(("report:", "figure:", "†"))}
    assert list(rows) == ["Pretrained", "Monotone (init)", "Baseline (recovered)", "Monotone (recovered)"]
    worst = final["across_seeds"]["arms"]["monotonic"]["worst_mean_abs_delta_nll"]
    assert f"{worst['mean']:.3f} [{worst['ci95'][0]:.3f}, {worst['ci95'][1]:.3f}]" in rows["Monotone (recovered)"]
    assert rows["Baseline (recovered)"].endswith("frontier")
    assert lines[-2:] == [f"report: {tmp_path / 'final' / 'results.md'}",
                          f"figure: {tmp_path / 'final' / 'robustness_vs_clean_loss.png'}"]
    assert not [l for l in lines if " vs " in l]                  # the pair tests are in results.md only
    md = (tmp_path / "final" / "results.md").read_text().splitlines()
    assert md[2].startswith("**Question.**") and md[4].startswith("**Answer (primary endpoint).** Monotone (recovered)")
    assert "no verdict: 1 seed; the primary test's unit is the seed (run 3 or more)" in md[4]
    assert md[6].startswith("**Figure.** [robustness_vs_clean_loss.png]")
    table = md[8:md.index("", 8)]
    assert len(table) == 2 + 4 and all(len(cell) < 40 for row in table for cell in row.split("|")[-2:])


def test_the_primary_test_is_the_one_the_config_names(tmp_path, capsys):
    from configs.experiment_config import AnalysisConfig, ConfigError
    from configs.presets import load_config
    run_aggregate(_work(tmp_path), None, False, "tiny", AnalysisConfig(primary_measure="hotflip_abs_delta_nll"))
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "PRIMARY  Monotone (recovered) minus the unconstrained frontier, HotFlip dNLL:"
    acr = json.loads((tmp_path / "final" / "final_results.json").read_text())["across_seeds"]
    assert acr["primary"]["measure"] == "hotflip_abs_delta_nll" and acr["primary"]["arm"] == "monotonic"
    assert "p_holm" not in acr["frontier"]["hotflip_abs_delta_nll"]["residuals"]["monotonic"]
    assert "p_holm" in acr["frontier"]["worst_abs_delta_nll"]["residuals"]["monotonic"]      # now secondary
    with pytest.raises(PipelineError, match="analysis.primary_measure must be one of"):
        run_aggregate(tmp_path, None, False, "tiny", AnalysisConfig(primary_measure="nope"))
    with pytest.raises(ConfigError, match="analysis.primary_arm must be monotonic or monotonic_init"):
        load_config("tiny", [("analysis.primary_arm", "baseline")])


def test_figures_keep_every_text_inside_the_canvas(tmp_path):
    from utils.results.plots import lead_figure, measures_figure
    finals = []
    for seeds in (None, [1]):                       # two seeds, and one (a longer primary line)
        work = _work(tmp_path / f"seeds_{seeds}")
        run_aggregate(work, seeds, False, "tiny")
        finals.append(json.loads((work / "final" / "final_results.json").read_text()))
    final = finals[0]
    for fig in (*(lead_figure(f) for f in finals), measures_figure(final)):
        if not fig.get_layout_engine():
            fig.tight_layout()                                      # as plots._save does
        fig.canvas.draw()
        renderer, canvas = fig.canvas.get_renderer(), fig.bbox
        ticks = {id(t) for ax in fig.axes for t in (*ax.get_xticklabels(), *ax.get_yticklabels())}
        texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text() and id(t) not in ticks]
        assert len(texts) > 10                  # titles, labels, legend entries, the inset's title
        for t in texts:
            box = t.get_window_extent(renderer)
            assert canvas.x0 - 1 <= box.x0 and box.x1 <= canvas.x1 + 1 and canvas.y0 - 1 <= box.y0 \
                and box.y1 <= canvas.y1 + 1, t.get_text()
        drawn = fig.get_tightbbox(renderer)      # every artist drawn, tick labels in view included (inches)
        assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01 and drawn.x1 <= fig.bbox_inches.x1 + 0.01 \
            and drawn.y1 <= fig.bbox_inches.y1 + 0.01
    lead = lead_figure(final)
    assert "Monotone (recovered) - frontier: " in lead.axes[0].get_title()
