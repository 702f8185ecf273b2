"""Stage 7: read every seed's per-example records and build the final numbers.

Nothing is re-derived from summaries: intervals and tests are computed from
the per-document and per-example records that stages 4-6 stored.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from configs.experiment_config import TEXT_ATTACKS, AnalysisConfig, AttackConfig, listed
from utils.run.run_files import PipelineError, read_json
from utils.results import attack_checks
from utils.results.convergence import convergence
from utils.results.frontier import MEASURES, adjust_secondary, frontier, measure_texts, primary_verdict
from utils.results.statistics import (bootstrap_interval, bootstrap_summary, hierarchical_bootstrap, holm,
                                      mcnemar_exact, mde, mean_of_seeds, paired_t, paired_t_mde,
                                      perplexity_bootstrap, t_interval, wilcoxon_paired, wilson_interval)

INPUTS = {  # result file -> the stage that writes it
    "monotonicity_certificate.json": "stage 1", "training_baseline.json": "stage 2",
    "training_monotonic.json": "stage 3", "monotonicity_certificate_monotonic.json": "stage 3",
    "evaluation.json": "stage 4", "uat.json": "stage 5",
    **{f"{n}.json": "stage 6" for n in TEXT_ATTACKS}, "worst_case.json": "stage 6"}
OPTIONAL_INPUTS = ("capabilities.json",         # stage 4 writes it only when eval.tasks names tasks
                   "training_unconstrained_from_init.json",   # stage 3, with controls.unconstrained_from_init
                   "ladder.json",                              # stage 3, with controls.ladder
                   "pgd.json")                                 # stage 6, unless attack.pgd_radii is empty
# stage 6's searches (the same threat model and record fields) and the worst case per text over them
THREAT_MODEL = (*TEXT_ATTACKS, "worst_case")
METRICS = ("perplexity", *(f"{n.removesuffix('_case')}_{m}" for n in THREAT_MODEL for m in ("success_rate", "mean_abs_delta_nll")),
           "random_flip_mean_abs_delta_nll", "uat_abs_delta_nll", "uat_rel_delta_nll")
SHARED_ARMS = ("pretrained", "monotonic_init")   # the same model for every seed: no seed changes them
ARM_ORDER = ("pretrained", "monotonic_init", "baseline", "monotonic", "unconstrained_from_init")   # controls: control_*


def is_shared(arm: str) -> bool:
    """Stage 0's controls are shared too: one model for every seed."""
    return arm in SHARED_ARMS or arm.startswith("control_")
LEVEL = 0.05                                     # significance level of every verdict


def find_seeds(work_dir: Path) -> list[int]:
    seeds = sorted(int(p.name.split("_", 1)[1]) for p in work_dir.glob("seed_*") if p.name[5:].isdigit())
    if not seeds:
        raise PipelineError(f"no seed_<S> directories in {work_dir}")
    return seeds


def expected_inputs(results: Path) -> dict:
    """INPUTS, less the stage 6 searches that seed's configuration left out (attack.text_attacks)."""
    cfg = results / "config_stage_6_hotflip_attacks.json"
    chosen = listed(read_json(cfg)["attack"].get("text_attacks", "hotflip")) if cfg.exists() else TEXT_ATTACKS
    return {name: stage for name, stage in INPUTS.items()
            if name.removesuffix(".json") not in TEXT_ATTACKS or name.removesuffix(".json") in chosen}


def collect(work_dir: Path, seeds: list[int], allow_partial: bool) -> tuple[dict, dict]:
    """Per seed, the result files that exist; and what is missing."""
    raw, missing = {}, {}
    for seed in seeds:
        results = work_dir / f"seed_{seed}" / "results"
        raw[seed] = {name: read_json(results / name) for name in (*INPUTS, *OPTIONAL_INPUTS)
                     if (results / name).exists()}
        gone = [f"{name} ({stage})" for name, stage in expected_inputs(results).items() if name not in raw[seed]]
        if gone:
            missing[seed] = gone
    if missing and not allow_partial:
        what = "; ".join(f"seed {s}: {', '.join(g)}" for s, g in missing.items())
        raise PipelineError(f"incomplete inputs: {what}. Rerun those stages, or pass --allow-partial "
                            "to aggregate what is complete (marked partial everywhere)")
    return raw, missing


def _by_doc(records: list[dict], key) -> dict:
    return {r["doc"]: key(r) for r in records}


def _paired(first: dict, second: dict) -> tuple[list, list]:
    docs = sorted(set(first) & set(second))
    return [first[d] for d in docs], [second[d] for d in docs]


def text_attack_row(name: str, m: dict, seed: int) -> dict:
    """One arm's HotFlip or GCG results of one seed, keys prefixed by the search's name."""
    ex = m["examples"]
    succ = [float(r["success"]) for r in ex]
    delta = [r["abs_delta_nll"] for r in ex]
    row = {f"{name}_success_rate": float(np.mean(succ)), f"{name}_successes": int(sum(succ)),
           f"n_{name}_texts": len(succ), f"{name}_success_ci95": wilson_interval(int(sum(succ)), len(succ)),
           f"{name}_mean_abs_delta_nll": float(np.mean(delta)), f"{name}_delta_ci95": bootstrap_interval(delta, seed=seed),
           f"{name}_mean_rel_delta_nll": float(np.mean([r["rel_delta_nll"] for r in ex])), f"{name}_abs_deltas": delta}
    if all("cost" in r for r in ex):
        row[f"{name}_forward_passes_per_text"] = float(np.mean([r["cost"]["forward_passes"] for r in ex]))
    if name == "hotflip":       # the control draws as many random flips as HotFlip made
        row.update(random_flip_mean_abs_delta_nll=m["random_control"]["mean_abs_delta_nll"],
                   random_flip_success_rate=m["random_control"]["success_rate"])
    return row


def seed_summary(seed: int, raw: dict, work_dir: Path) -> dict:
    out = {"arms": {}, "transfer": {}, "training": {}, "tests": {}}
    ev, ua = raw.get("evaluation.json"), raw.get("uat.json")
    text = {n.removesuffix("_case"): raw[f"{n}.json"] for n in THREAT_MODEL if f"{n}.json" in raw}
    arms = list((ev or ua or next(iter(text.values()), None) or {"models": {}})["models"])
    for arm in arms:
        row = {}
        if ev and arm in ev["models"]:
            m = ev["models"][arm]
            row.update(label=m["label"], perplexity=m["perplexity"], bits_per_byte=m["bits_per_byte"],
                       perplexity_ci95=perplexity_bootstrap(m["per_document"]["nll"], m["per_document"]["tokens"],
                                                            seed=seed), n_documents=len(m["per_document"]["nll"]))
        for name, res in text.items():
            if arm in res["models"]:
                row.update(label=res["models"][arm]["label"], **text_attack_row(name, res["models"][arm], seed))
        if ua and arm in ua["models"]:
            m = ua["models"][arm]
            per = [e["triggered_nll"] - e["clean_nll"] for e in m["examples"]]
            row.update(uat_abs_delta_nll=m["eval"]["abs_delta_nll"], uat_rel_delta_nll=m["eval"]["rel_delta_nll"],
                       uat_delta_ci95=bootstrap_interval(per, seed=seed), uat_trigger=m["trigger_text"],
                       n_uat_texts=len(per))
        out["arms"][arm] = row
    if ua:
        out["transfer"]["uat_rel_delta_nll"] = {s: {t: v["rel_delta_nll"] for t, v in row.items()}
                                                for s, row in ua["transfer"].items()}
    for name, res in ((n, r) for n, r in text.items() if "transfer" in r):
        out["transfer"][f"{name}_success_rate"] = {s: {t: v["success_rate"] for t, v in row.items()}
                                                   for s, row in res["transfer"].items()}
    for arm in ("baseline", "monotonic", "unconstrained_from_init"):
        tr = raw.get(f"training_{arm}.json")
        if tr:
            h = tr["history"]
            out["training"][arm] = {
                "tokens": h["tokens"], "lr": tr.get("recipe", {}).get("lr"), "lr_sweep": tr.get("lr_sweep"), "final_val_loss": h["val_loss"], "best_val_loss": h["best_val_loss"],
                "start_val_perplexity": tr["start_val_perplexity"], "final_val_perplexity": tr["final_val_perplexity"],
                "fraction_V_changed": tr["movement"]["fraction_V_changed"],
                "trainable": tr.get("recipe", {}).get("trainable", "all"),
                "relative_weight_change": {g: v["relative_delta"]
                                           for g, v in tr["movement"].get("groups", {}).items()},
                "curve": [(r["tokens"], r["val_loss"]) for r in h["steps"] if r.get("val_loss") is not None],
                "train_curve": [(r["tokens"], r["train_loss"]) for r in h["steps"] if r.get("train_loss") is not None]}
    if raw.get("ladder.json"):      # the same-history controls: each rung's tokens and loss, and whether they bracket
        lad = raw["ladder.json"]
        out["ladder"] = {k: lad[k] for k in ("lr", "full_tokens", "monotonic_val_loss", "unconstrained_from_init_val_loss",
                                             "rungs", "bracketed")}
    # Paired tests: baseline vs monotonic on the same documents.
    for name, res in ((n, r) for n, r in text.items() if n in ("hotflip", "gcg")):
        if {"baseline", "monotonic"} <= set(res["models"]):
            b, m = res["models"]["baseline"]["examples"], res["models"]["monotonic"]["examples"]
            out["tests"][f"{name}_success"] = mcnemar_exact(*_paired(_by_doc(b, lambda r: r["success"]),
                                                                     _by_doc(m, lambda r: r["success"])))
            out["tests"][f"{name}_abs_delta_nll"] = wilcoxon_paired(
                *_paired(_by_doc(b, lambda r: r["abs_delta_nll"]), _by_doc(m, lambda r: r["abs_delta_nll"])))
    if ua and {"baseline", "monotonic"} <= set(ua["models"]):
        key = lambda e: e["triggered_nll"] - e["clean_nll"]  # noqa: E731
        # Conditional on the two triggers this seed's searches found: the texts are the unit here,
        # the search is not (the across-seed test in pooled_tests is the one the verdict uses).
        out["tests"]["uat_abs_delta_nll_given_triggers"] = wilcoxon_paired(*_paired(_by_doc(ua["models"]["baseline"]["examples"], key),
                                                                     _by_doc(ua["models"]["monotonic"]["examples"], key)))
    caps = raw.get("capabilities.json")
    if caps:
        out["capabilities"] = {arm: {task: {"acc": r["metrics"].get("acc"), "acc_stderr": r["metrics"].get("acc_stderr"),
                                            "n": r["n"]} for task, r in m["tasks"].items()}
                               for arm, m in caps["models"].items()}
        out["capability_harness"] = caps["harness"]
    out["certificates"] = {arm: {"monotone": c["monotone"], "scope": c["scope"],
                                 "total_violations": c["total_violations"], "min_weight": c["min_weight"]}
                           for arm, name in (("monotonic_init", "monotonicity_certificate.json"),
                                             ("monotonic", "monotonicity_certificate_monotonic.json"))
                           if (c := raw.get(name))}
    cfg_files = sorted((work_dir / f"seed_{seed}" / "results").glob("config_*.json"))
    out["config"] = read_json(cfg_files[-1]) if cfg_files else None
    flags = sorted((work_dir / f"seed_{seed}" / "flags").glob("*.done"))
    out["code_revisions"] = sorted({json.loads(f.read_text()).get("code_revision") for f in flags})
    return out


PAIR_MEASURES = ("worst_abs_delta_nll", "worst_success", "hotflip_success", "hotflip_abs_delta_nll", "gcg_success",
                 "gcg_abs_delta_nll", "uat_abs_delta_nll")


def abs_threshold(raw: dict) -> float:
    """attack.success_abs_nats of the runs (stage 6 records it; older runs: the default)."""
    found = {r[f"{n}.json"].get("success_abs_nats", AttackConfig.success_abs_nats)
             for r in raw.values() for n in TEXT_ATTACKS if f"{n}.json" in r}
    if len(found) > 1:
        raise PipelineError(f"the seeds were attacked with different attack.success_abs_nats {sorted(found)}")
    return found.pop() if found else AttackConfig.success_abs_nats


def pair_tests(raw: dict, arms: list[str], n_boot: int = 2000) -> dict:
    """Every pair of `arms` on every measure of PAIR_MEASURES: the mean per-text difference first minus
    second (the same texts attacked on both), its hierarchical-bootstrap interval and test, and the
    smallest difference that test would detect at 80% power."""
    out, nats = {}, abs_threshold(raw)
    for measure in PAIR_MEASURES:
        per_seed = measure_texts(raw, measure, nats)
        for i, a in enumerate(arms):
            for b in arms[i + 1:]:
                seeds = [{"d": np.subtract(s[a]["value"], s[b]["value"])} for s in per_seed if a in s and b in s]
                if not seeds:
                    continue
                est, draws = hierarchical_bootstrap(seeds, mean_of_seeds("d"), n_boot=n_boot)
                out[f"{measure}: {a} vs {b}"] = {
                    **bootstrap_summary(float(est), draws), "measure": measure, "arms": [a, b],
                    "test": "hierarchical bootstrap of the mean paired difference (first - second)",
                    "unit": "attacked text within seed (seeds, then texts resampled)", "n": len(seeds),
                    "n_texts": sum(len(s["d"]) for s in seeds)}
                if measure.startswith("uat"):     # a trigger search per seed and arm: the seed as the only unit too
                    means = [float(np.mean(s["d"])) for s in seeds]
                    t = paired_t(means, [0.0] * len(means))
                    out[f"{measure}: {a} vs {b}"]["seed_level"] = {
                        **t, "mde80": paired_t_mde(len(means), float(np.std(means, ddof=1)) if len(means) > 1 else 0.0)}
    return out


def verdicts(tests: dict, n_seeds: int, level: float = LEVEL) -> dict:
    """Which arm of each pair is more robust (less damage), named only where its test rejects equality at
    `level` after Holm's adjustment over every test of this report (each test gains `p_holm`); beside each
    "no significant difference", the difference the test would have detected at 80% power."""
    adjusted = holm({k: t["p_value"] for k, t in tests.items() if t.get("p_value") is not None})
    caveat = "; ONE SEED: texts only, says nothing about seed-to-seed variation" if n_seeds == 1 else ""
    out = {}
    for key, t in tests.items():
        t["p_holm"] = adjusted[key]
        t["mde80"], t["mde_alpha"] = mde(t["se"], level / len(adjusted)), level / len(adjusted)  # Holm's first step
        said = (f"mean difference {t['mean']:+.3g} [{t['ci95'][0]:+.3g}, {t['ci95'][1]:+.3g}], n = {t['n']} seed(s), "
                f"{t['n_texts']} texts, p = {t['p_value']:.3g}, Holm-adjusted over {len(adjusted)} tests "
                f"p = {t['p_holm']:.3g}{caveat}")
        first, second = t["arms"]
        if t["p_holm"] < level and t["mean"] != 0:
            out[key] = f"{first if t['mean'] < 0 else second} ({said})"
        elif not t["se"] > 0:
            out[key] = f"no test: the measure does not vary in any draw (saturated or identical records; {said})"
        else:
            out[key] = f"no significant difference at {level} (detectable at 80% power: {t['mde80']:.3g}; {said})"
    return out


def arm_attack_stats(raw: dict, arm: str, texts: dict, n_boot: int = 2000) -> dict:
    """An arm's attack measures across seeds: the mean of the seed means, hierarchical-bootstrap interval.
    `texts`: measure_texts of every measure, read once for every arm."""
    out = {}
    for measure, key in (("worst_success", "worst_success_rate"), ("worst_success_abs", "worst_success_abs_rate"),
                         ("worst_abs_delta_nll", "worst_mean_abs_delta_nll"),
                         ("gcg_surrogate_abs_delta_nll", "gcg_surrogate_mean_abs_delta_nll"),
                         ("random_search_abs_delta_nll", "random_search_mean_abs_delta_nll"),
                         ("hotflip_success", "hotflip_success_rate"), ("hotflip_success_abs", "hotflip_success_abs_rate"),
                         ("hotflip_abs_delta_nll", "hotflip_mean_abs_delta_nll"), ("gcg_success", "gcg_success_rate"),
                         ("gcg_success_abs", "gcg_success_abs_rate"), ("gcg_abs_delta_nll", "gcg_mean_abs_delta_nll"),
                         ("uat_abs_delta_nll", "uat_abs_delta_nll")):
        seeds = [{"v": s[arm]["value"]} for s in texts[measure] if arm in s]
        if seeds:
            est, draws = hierarchical_bootstrap(seeds, mean_of_seeds("v"), n_boot=n_boot)
            summary = bootstrap_summary(float(est), draws)
            out[key] = {"n": len(seeds), "n_texts": sum(len(s["v"]) for s in seeds), "mean": summary["mean"],
                        "ci95": summary["ci95"], "interval": summary["interval"]}
    # UAT relative damage: a ratio of means, resampled the same way.
    seeds = [{"c": [e["clean_nll"] for e in f["uat.json"]["models"][arm]["examples"]],
              "t": [e["triggered_nll"] for e in f["uat.json"]["models"][arm]["examples"]]}
             for f in raw.values() if arm in f.get("uat.json", {}).get("models", {})]
    if seeds:
        est, draws = hierarchical_bootstrap(seeds, lambda x: np.mean([s["t"] / s["c"] - 1 for s in x], axis=0),
                                            n_boot=n_boot)
        summary = bootstrap_summary(float(est), draws)
        out["uat_rel_delta_nll"] = {"n": len(seeds), "mean": summary["mean"], "ci95": summary["ci95"],
                                    "interval": summary["interval"]}
    return out


def success_curves(raw: dict, arms: list[str], thresholds=None) -> dict:
    """Per attack and arm, the fraction of attacked texts whose mean NLL rose by more than each absolute
    threshold (nats/token): success at every threshold at once, for final/success_vs_threshold.png."""
    thresholds = np.linspace(0, 3, 61) if thresholds is None else np.asarray(thresholds, float)
    out = {"thresholds": thresholds.tolist(), "attacks": {}}
    for attack in ("worst", "hotflip", "gcg", "uat"):
        per_seed = measure_texts(raw, f"{attack}_abs_delta_nll", 0.0)
        if not per_seed:
            continue
        out["attacks"][attack] = {
            arm: [float(np.mean([np.mean(np.asarray(s[arm]["value"]) > t) for s in per_seed if arm in s])) for t in thresholds]
            for arm in arms if any(arm in s for s in per_seed)}
    return out


def capability_summary(per_seed: dict, raw: dict) -> dict:
    """Per task: each arm's accuracy across seeds (t interval), and baseline vs monotone paired on the
    same examples (McNemar, examples pooled over seeds)."""
    tasks = sorted({t for s in per_seed.values() for arm in s.get("capabilities", {}).values() for t in arm})
    out = {}
    for task in tasks:
        arms = sorted({a for s in per_seed.values() for a, r in s.get("capabilities", {}).items() if task in r})
        row = {"arms": {a: t_interval([s["capabilities"][a][task]["acc"] for s in per_seed.values()
                                       if task in s.get("capabilities", {}).get(a, {})]) for a in arms}}
        first, second = [], []
        for files in raw.values():
            caps = files.get("capabilities.json")
            if caps and all(task in caps["models"].get(a, {}).get("tasks", {}) for a in ("baseline", "monotonic")):
                b, m = (caps["models"][a]["tasks"][task]["correct"] for a in ("baseline", "monotonic"))
                first.extend(x > 0.5 for x in b)
                second.extend(x > 0.5 for x in m)
        if first:
            row["test"] = {**mcnemar_exact(first, second), "unit": "task example, pooled over seeds",
                           "n": len(first)}
        out[task] = row
    return out


def across_seeds(per_seed: dict, raw: dict, analysis: AnalysisConfig) -> dict:
    """Every arm and measure across seeds: t intervals over seeds, except success rates (Wilson
    over every attacked text, inside [0, 1]) and the shared arms' perplexity (one model and one
    test set for every seed: its bootstrap interval over documents, not a zero-width one)."""
    arms = sorted({a for s in per_seed.values() for a in s["arms"]})
    out = {"arms": {}, "monotonic_minus_baseline": {}}
    nats = abs_threshold(raw)
    texts = {m: measure_texts(raw, m, nats) for m in MEASURES}
    for arm in arms:
        rows = [s["arms"][arm] for s in per_seed.values() if arm in s["arms"]]
        stats = {k: t_interval([r[k] for r in rows if k in r]) for k in METRICS}
        stats.update(arm_attack_stats(raw, arm, texts))
        if is_shared(arm) and rows and "perplexity" in rows[0]:
            stats["perplexity"] = {"n": len(rows), "mean": rows[0]["perplexity"], "ci95": rows[0]["perplexity_ci95"],
                                   "interval": "bootstrap over documents (the same model for every seed)"}
        stats["shared"] = is_shared(arm)
        out["arms"][arm] = stats
    for k in METRICS:
        diffs = [s["arms"]["monotonic"][k] - s["arms"]["baseline"][k] for s in per_seed.values()
                 if k in s["arms"].get("monotonic", {}) and k in s["arms"].get("baseline", {})]
        out["monotonic_minus_baseline"][k] = t_interval(diffs)
    if any("capabilities" in s for s in per_seed.values()):
        out["capabilities"] = capability_summary(per_seed, raw)
    tested = [a for a in ARM_ORDER if a in arms]         # every arm but the controls, which the frontier uses
    out["tests"] = pair_tests(raw, tested)
    out["more_robust"] = verdicts(out["tests"], len(per_seed), analysis.alpha)
    out["success_abs_nats"] = nats
    out["frontier"] = {m: f for m in MEASURES if (f := frontier(raw, m, nats, which=analysis.frontier)) is not None}
    measure, arm = analysis.primary_measure, analysis.primary_arm
    adjust_secondary(out["frontier"], (measure, arm), analysis.alpha)
    out["primary"] = {"measure": measure, "arm": arm, "alpha": analysis.alpha, "test": "one-sample t over seeds",
                      "verdict": None}
    if arm in out["frontier"].get(measure, {}).get("residuals", {}):
        r = out["frontier"][measure]["residuals"][arm]
        r["verdict"] = out["primary"]["verdict"] = primary_verdict(r, analysis.alpha)
    out["success_curves"] = success_curves(raw, arms)
    out["convergence"] = convergence(raw)
    out["worst_won_by"] = {arm: {n: sum(f["worst_case.json"]["models"][arm]["won_by"].get(n, 0) for f in raw.values()
                                        if arm in f.get("worst_case.json", {}).get("models", {}))
                                 for n in TEXT_ATTACKS} for arm in arms}
    out["masking"] = attack_checks.masking(raw, arms)
    out["surrogate_ranking"] = attack_checks.ranking(out["arms"])
    out["pgd"] = attack_checks.pgd(raw, arms)
    out["uat_restarts"] = attack_checks.uat_restarts(raw, arms)
    return out


def provenance(work_dir: Path, preset: str) -> dict:
    """What was measured: preset, model and data, from stage 0's manifest."""
    path = work_dir / "shared" / "manifest.json"
    if not path.exists():
        return {"preset": preset}
    m = read_json(path)
    model = m.get("model") or {"source": "tiny", "path": m.get("pretrained_path")}
    cfg = m["config"]["data"]
    data = m.get("dataset") or {"source": cfg["source"], "files": {s: cfg[f"{s}_file"] for s in ("train", "val", "test")}
                                if cfg["source"] != "stdlib" else "Python standard library docstrings"}
    return {"preset": preset, "model": {k: model.get(k) for k in ("source", "hub_id", "sha", "path") if model.get(k)},
            "data": {k: data[k] for k in ("source", "hub_id", "sha", "files") if k in data},
            "documents": {s: c["documents"] for s, c in m.get("corpus", {}).items()},
            "heldout_overlap": {s: {k: r[k] for k in ("documents", "near_duplicates", "removed", "threshold",
                                                      "shingle_tokens", "sample_rate")}
                                for s, r in m.get("heldout_overlap", {}).items()}}


def run_aggregate(work_dir: Path, seeds: list[int] | None, allow_partial: bool, preset: str,
                  analysis: AnalysisConfig | None = None) -> list[str]:
    """Stage 7: every seed of the work dir into final/; `analysis` names the primary test (default: the
    config's default)."""
    analysis = analysis or AnalysisConfig()
    if analysis.primary_measure not in MEASURES:
        raise PipelineError(f"analysis.primary_measure must be one of {', '.join(MEASURES)}, "
                            f"got {analysis.primary_measure!r}")
    from utils.results import paper_protocol
    from utils.results.plots import plots
    from utils.results.report import LEAD_FIGURE, latex, markdown
    from utils.results.summary import screen_summary
    from utils.run.run_files import atomic_write_text, write_json
    seeds = seeds or find_seeds(work_dir)
    raw, missing = collect(work_dir, seeds, allow_partial)
    per_seed = {str(s): seed_summary(s, raw[s], work_dir) for s in seeds}
    thresholds = {r[f"{n}.json"]["success_threshold"] for r in raw.values() for n in THREAT_MODEL if f"{n}.json" in r}
    final = {"preset": preset, "provenance": provenance(work_dir, preset), "seeds": seeds, "partial": bool(missing),
             "missing": {str(s): m for s, m in missing.items()},
             "success_threshold": thresholds.pop() if len(thresholds) == 1 else None,
             "per_seed": per_seed, "across_seeds": across_seeds(per_seed, raw, analysis)}
    final["paper_protocol"] = paper_protocol.summary(raw, final)
    out = work_dir / "final"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "final_results.json", final)
    write_json(out / "matched_control.json", {"seeds": seeds, "partial": bool(missing),
                                              "success_abs_nats": final["across_seeds"]["success_abs_nats"],
                                              "frontier": final["across_seeds"]["frontier"]})
    atomic_write_text(out / "results.md", markdown(final))
    atomic_write_text(out / "table.tex", latex(final))                  # \\input into a paper
    atomic_write_text(out / "table_standalone.tex", latex(final, standalone=True))
    written = plots(final, out)
    print(screen_summary(final, out / "results.md", out / LEAD_FIGURE))
    return [str(out / n) for n in ("final_results.json", "matched_control.json", "results.md", "table.tex", "table_standalone.tex")] + \
           [str(p) for p in written]
