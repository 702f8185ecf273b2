"""Stage 7: read every seed's per-example records and build the final numbers.

Nothing is re-derived from summaries: intervals and tests are computed from
the per-document and per-example records that stages 4-6 stored.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from configs.experiment_config import listed
from utils.run.run_files import PipelineError, read_json
from utils.results.statistics import (bootstrap_interval, holm, mcnemar_exact, paired_t, perplexity_bootstrap,
                                      t_interval, wilcoxon_paired, wilson_interval)

INPUTS = {  # result file -> the stage that writes it
    "monotonicity_certificate.json": "stage 1", "training_baseline.json": "stage 2",
    "training_monotonic.json": "stage 3", "monotonicity_certificate_monotonic.json": "stage 3",
    "evaluation.json": "stage 4", "uat.json": "stage 5",
    "hotflip.json": "stage 6", "gcg.json": "stage 6"}
OPTIONAL_INPUTS = ("capabilities.json",)      # stage 4 writes it only when eval.tasks names tasks
TEXT_ATTACKS = ("hotflip", "gcg")             # stage 6's searches: the same threat model and record fields
METRICS = ("perplexity", *(f"{n}_{m}" for n in TEXT_ATTACKS for m in ("success_rate", "mean_abs_delta_nll")),
           "random_flip_mean_abs_delta_nll", "uat_abs_delta_nll", "uat_rel_delta_nll")
SHARED_ARMS = ("pretrained", "monotonic_init")   # the same model for every seed: no seed changes them
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
    text = {n: raw[f"{n}.json"] for n in TEXT_ATTACKS if f"{n}.json" in raw}
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
    for name, res in text.items():
        out["transfer"][f"{name}_success_rate"] = {s: {t: v["success_rate"] for t, v in row.items()}
                                                   for s, row in res["transfer"].items()}
    for arm in ("baseline", "monotonic"):
        tr = raw.get(f"training_{arm}.json")
        if tr:
            h = tr["history"]
            out["training"][arm] = {
                "tokens": h["tokens"], "final_val_loss": h["val_loss"], "best_val_loss": h["best_val_loss"],
                "start_val_perplexity": tr["start_val_perplexity"], "final_val_perplexity": tr["final_val_perplexity"],
                "fraction_V_changed": tr["movement"]["fraction_V_changed"],
                "trainable": tr.get("recipe", {}).get("trainable", "all"),
                "relative_weight_change": {g: v["relative_delta"]
                                           for g, v in tr["movement"].get("groups", {}).items()},
                "curve": [(r["tokens"], r["val_loss"]) for r in h["steps"] if r.get("val_loss") is not None],
                "train_curve": [(r["tokens"], r["train_loss"]) for r in h["steps"] if r.get("train_loss") is not None]}
    # Paired tests: baseline vs monotonic on the same documents.
    for name, res in text.items():
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


def pooled_tests(raw: dict) -> dict:
    """Baseline vs monotone over every seed, each test on its proper unit.

    HotFlip and GCG: the attacked text (pairs: the same text attacked on both arms), pooled over seeds.
    UAT: the trigger search, i.e. the seed (one damage per arm and seed): a paired t-test."""
    pairs = {(n, k): ([], []) for n in TEXT_ATTACKS for k in ("success", "abs_delta_nll")}
    uat = ([], [])
    for files in raw.values():
        ua = files.get("uat.json")
        for name in TEXT_ATTACKS:
            res = files.get(f"{name}.json")
            if res and {"baseline", "monotonic"} <= set(res["models"]):
                b, m = (res["models"][a]["examples"] for a in ("baseline", "monotonic"))
                for field in ("success", "abs_delta_nll"):
                    x, y = _paired(_by_doc(b, lambda r, f=field: r[f]), _by_doc(m, lambda r, f=field: r[f]))
                    pairs[name, field][0].extend(x)
                    pairs[name, field][1].extend(y)
        if ua and {"baseline", "monotonic"} <= set(ua["models"]):
            uat[0].append(ua["models"]["baseline"]["eval"]["abs_delta_nll"])
            uat[1].append(ua["models"]["monotonic"]["eval"]["abs_delta_nll"])
    out = {}
    for name in TEXT_ATTACKS:
        succ, delta = pairs[name, "success"], pairs[name, "abs_delta_nll"]
        if succ[0]:
            out[f"{name}_success_rate"] = {**mcnemar_exact(*succ), "unit": "attacked text, pooled over seeds",
                                           "n": len(succ[0])}
            out[f"{name}_mean_abs_delta_nll"] = {**wilcoxon_paired(*delta), "unit": "attacked text, pooled over seeds",
                                                 "n": len(delta[0])}
    if uat[0]:
        out["uat_abs_delta_nll"] = {**paired_t(*uat), "unit": "trigger search (one per seed and arm)"}
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


def verdicts(tests: dict, across: dict, n_seeds: int) -> dict:
    """Which arm is more robust (less damage) per measure, named only where its test rejects equality at
    LEVEL after Holm's adjustment over every test of this report (each test gains `p_holm`)."""
    adjusted = holm({k: t["p_value"] for k, t in tests.items() if t.get("p_value") is not None})
    caveat = "; ONE SEED: says nothing about seed-to-seed variation" if n_seeds == 1 else ""
    out = {}
    for key, t in tests.items():
        b, m = across["baseline"][key]["mean"], across["monotonic"][key]["mean"]
        if t.get("p_value") is None:
            out[key] = f"no test possible ({t['test']} over seeds needs at least 2 seeds)"
            continue
        t["p_holm"] = adjusted[key]
        said = (f"{t['test']}, n = {t.get('n', n_seeds)} ({t['unit']}), p = {t['p_value']:.3g}, "
                f"Holm-adjusted over {len(adjusted)} tests p = {t['p_holm']:.3g}{caveat}")
        if t["p_holm"] < LEVEL and m != b:
            out[key] = f"{'monotonic' if m < b else 'baseline'} ({said})"
        else:
            out[key] = f"no significant difference at {LEVEL} ({said})"
    return out


def across_seeds(per_seed: dict, raw: dict) -> dict:
    """Every arm and measure across seeds: t intervals over seeds, except success rates (Wilson
    over every attacked text, inside [0, 1]) and the shared arms' perplexity (one model and one
    test set for every seed: its bootstrap interval over documents, not a zero-width one)."""
    arms = sorted({a for s in per_seed.values() for a in s["arms"]})
    out = {"arms": {}, "monotonic_minus_baseline": {}}
    for arm in arms:
        rows = [s["arms"][arm] for s in per_seed.values() if arm in s["arms"]]
        stats = {k: t_interval([r[k] for r in rows if k in r]) for k in METRICS}
        for name in TEXT_ATTACKS:
            hits = [(r[f"{name}_successes"], r[f"n_{name}_texts"]) for r in rows if f"{name}_successes" in r]
            if hits:
                k, n = sum(h for h, _ in hits), sum(n for _, n in hits)
                stats[f"{name}_success_rate"] = {"n": len(hits), "n_texts": n, "mean": k / n, "ci95": wilson_interval(k, n),
                                                 "interval": "Wilson, texts pooled over seeds"}
        if arm in SHARED_ARMS and rows and "perplexity" in rows[0]:
            stats["perplexity"] = {"n": len(rows), "mean": rows[0]["perplexity"], "ci95": rows[0]["perplexity_ci95"],
                                   "interval": "bootstrap over documents (the same model for every seed)"}
        stats["shared"] = arm in SHARED_ARMS
        out["arms"][arm] = stats
    for k in METRICS:
        diffs = [s["arms"]["monotonic"][k] - s["arms"]["baseline"][k] for s in per_seed.values()
                 if k in s["arms"].get("monotonic", {}) and k in s["arms"].get("baseline", {})]
        out["monotonic_minus_baseline"][k] = t_interval(diffs)
    if any("capabilities" in s for s in per_seed.values()):
        out["capabilities"] = capability_summary(per_seed, raw)
    if {"baseline", "monotonic"} <= set(arms):
        out["tests"] = pooled_tests(raw)
        out["more_robust"] = verdicts(out["tests"], out["arms"], len(per_seed))
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


def run_aggregate(work_dir: Path, seeds: list[int] | None, allow_partial: bool, preset: str) -> list[str]:
    from utils.results.plots import plots
    from utils.results.report import latex, markdown, screen_summary
    from utils.run.run_files import atomic_write_text, write_json
    seeds = seeds or find_seeds(work_dir)
    raw, missing = collect(work_dir, seeds, allow_partial)
    per_seed = {str(s): seed_summary(s, raw[s], work_dir) for s in seeds}
    thresholds = {r[f"{n}.json"]["success_threshold"] for r in raw.values() for n in TEXT_ATTACKS if f"{n}.json" in r}
    final = {"preset": preset, "provenance": provenance(work_dir, preset), "seeds": seeds, "partial": bool(missing),
             "missing": {str(s): m for s, m in missing.items()},
             "success_threshold": thresholds.pop() if len(thresholds) == 1 else None,
             "per_seed": per_seed, "across_seeds": across_seeds(per_seed, raw)}
    out = work_dir / "final"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "final_results.json", final)
    atomic_write_text(out / "results.md", markdown(final))
    atomic_write_text(out / "table.tex", latex(final))                  # \\input into a paper
    atomic_write_text(out / "table_standalone.tex", latex(final, standalone=True))
    written = plots(final, out)
    print(screen_summary(final, out / "results.md"))
    return [str(out / n) for n in ("final_results.json", "results.md", "table.tex", "table_standalone.tex")] + \
           [str(p) for p in written]
