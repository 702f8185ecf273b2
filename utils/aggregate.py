"""Stage 7: read every seed's per-example records and build the final numbers.

Nothing is re-derived from summaries: intervals and tests are computed from
the per-document and per-example records that stages 4-6 stored.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from utils.run_files import PipelineError, read_json
from utils.statistics import (bootstrap_interval, mcnemar_exact, perplexity_bootstrap, t_interval,
                              wilcoxon_paired)

INPUTS = {  # result file -> the stage that writes it
    "monotonicity_certificate.json": "stage 1", "training_baseline.json": "stage 2",
    "training_monotonic.json": "stage 3", "monotonicity_certificate_monotonic.json": "stage 3",
    "evaluation.json": "stage 4", "uat.json": "stage 5",
    "hotflip.json": "stage 6"}
METRICS = ("perplexity", "hotflip_success_rate", "hotflip_mean_abs_delta_nll", "random_flip_mean_abs_delta_nll",
           "uat_abs_delta_nll", "uat_rel_delta_nll")


def find_seeds(work_dir: Path) -> list[int]:
    seeds = sorted(int(p.name.split("_", 1)[1]) for p in work_dir.glob("seed_*") if p.name[5:].isdigit())
    if not seeds:
        raise PipelineError(f"no seed_<S> directories in {work_dir}")
    return seeds


def collect(work_dir: Path, seeds: list[int], allow_partial: bool) -> tuple[dict, dict]:
    """Per seed, the result files that exist; and what is missing."""
    raw, missing = {}, {}
    for seed in seeds:
        results = work_dir / f"seed_{seed}" / "results"
        raw[seed] = {name: read_json(results / name) for name in INPUTS if (results / name).exists()}
        gone = [f"{name} ({stage})" for name, stage in INPUTS.items() if name not in raw[seed]]
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


def seed_summary(seed: int, raw: dict, work_dir: Path) -> dict:
    out = {"arms": {}, "transfer": {}, "training": {}, "tests": {}}
    ev, hf, ua = raw.get("evaluation.json"), raw.get("hotflip.json"), raw.get("uat.json")
    arms = list((ev or hf or ua or {"models": {}})["models"])
    for arm in arms:
        row = {}
        if ev and arm in ev["models"]:
            m = ev["models"][arm]
            row.update(label=m["label"], perplexity=m["perplexity"], bits_per_byte=m["bits_per_byte"],
                       perplexity_ci95=perplexity_bootstrap(m["per_document"]["nll"], m["per_document"]["tokens"],
                                                            seed=seed))
        if hf and arm in hf["models"]:
            ex = hf["models"][arm]["examples"]
            succ = [float(r["success"]) for r in ex]
            delta = [r["abs_delta_nll"] for r in ex]
            row.update(label=hf["models"][arm]["label"], hotflip_success_rate=float(np.mean(succ)),
                       hotflip_success_ci95=bootstrap_interval(succ, seed=seed),
                       hotflip_mean_abs_delta_nll=float(np.mean(delta)),
                       hotflip_delta_ci95=bootstrap_interval(delta, seed=seed),
                       hotflip_mean_rel_delta_nll=float(np.mean([r["rel_delta_nll"] for r in ex])),
                       hotflip_abs_deltas=delta,
                       random_flip_mean_abs_delta_nll=hf["models"][arm]["random_control"]["mean_abs_delta_nll"],
                       random_flip_success_rate=hf["models"][arm]["random_control"]["success_rate"])
        if ua and arm in ua["models"]:
            m = ua["models"][arm]
            per = [e["triggered_nll"] - e["clean_nll"] for e in m["examples"]]
            row.update(uat_abs_delta_nll=m["eval"]["abs_delta_nll"], uat_rel_delta_nll=m["eval"]["rel_delta_nll"],
                       uat_delta_ci95=bootstrap_interval(per, seed=seed), uat_trigger=m["trigger_text"])
        out["arms"][arm] = row
    if ua:
        out["transfer"]["uat_rel_delta_nll"] = {s: {t: v["rel_delta_nll"] for t, v in row.items()}
                                                for s, row in ua["transfer"].items()}
    if hf:
        out["transfer"]["hotflip_success_rate"] = {s: {t: v["success_rate"] for t, v in row.items()}
                                                   for s, row in hf["transfer"].items()}
    for arm in ("baseline", "monotonic"):
        tr = raw.get(f"training_{arm}.json")
        if tr:
            h = tr["history"]
            out["training"][arm] = {
                "tokens": h["tokens"], "final_val_loss": h["val_loss"], "best_val_loss": h["best_val_loss"],
                "start_val_perplexity": tr["start_val_perplexity"], "final_val_perplexity": tr["final_val_perplexity"],
                "fraction_V_changed": tr["movement"]["fraction_V_changed"],
                "curve": [(r["tokens"], r["val_loss"]) for r in h["steps"] if r.get("val_loss") is not None]}
    # Paired tests: baseline vs monotonic on the same documents.
    if hf and {"baseline", "monotonic"} <= set(hf["models"]):
        b, m = hf["models"]["baseline"]["examples"], hf["models"]["monotonic"]["examples"]
        out["tests"]["hotflip_success"] = mcnemar_exact(*_paired(_by_doc(b, lambda r: r["success"]),
                                                                 _by_doc(m, lambda r: r["success"])))
        out["tests"]["hotflip_abs_delta_nll"] = wilcoxon_paired(*_paired(_by_doc(b, lambda r: r["abs_delta_nll"]),
                                                                         _by_doc(m, lambda r: r["abs_delta_nll"])))
    if ua and {"baseline", "monotonic"} <= set(ua["models"]):
        key = lambda e: e["triggered_nll"] - e["clean_nll"]  # noqa: E731
        out["tests"]["uat_abs_delta_nll"] = wilcoxon_paired(*_paired(_by_doc(ua["models"]["baseline"]["examples"], key),
                                                                     _by_doc(ua["models"]["monotonic"]["examples"], key)))
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


def _more_robust(base: dict, mono: dict) -> dict:
    """Which arm is more robust on each measure (lower is more robust), computed, not assumed."""
    verdict = {}
    for key in ("hotflip_success_rate", "hotflip_mean_abs_delta_nll", "uat_abs_delta_nll"):
        b, m = base.get(key, {}).get("mean"), mono.get(key, {}).get("mean")
        if b is None or m is None:
            continue
        verdict[key] = "tie" if b == m else ("monotonic" if m < b else "baseline")
    return verdict


def across_seeds(per_seed: dict) -> dict:
    arms = sorted({a for s in per_seed.values() for a in s["arms"]})
    out = {"arms": {}, "monotonic_minus_baseline": {}}
    for arm in arms:
        out["arms"][arm] = {k: t_interval([s["arms"][arm][k] for s in per_seed.values()
                                           if k in s["arms"].get(arm, {})]) for k in METRICS}
    for k in METRICS:
        diffs = [s["arms"]["monotonic"][k] - s["arms"]["baseline"][k] for s in per_seed.values()
                 if k in s["arms"].get("monotonic", {}) and k in s["arms"].get("baseline", {})]
        out["monotonic_minus_baseline"][k] = t_interval(diffs)
    if {"baseline", "monotonic"} <= set(arms):
        out["more_robust"] = _more_robust(out["arms"]["baseline"], out["arms"]["monotonic"])
    return out


def run_aggregate(work_dir: Path, seeds: list[int] | None, allow_partial: bool, preset: str) -> list[str]:
    from utils.report import latex, markdown, plots, screen_summary
    from utils.run_files import atomic_write_text, write_json
    seeds = seeds or find_seeds(work_dir)
    raw, missing = collect(work_dir, seeds, allow_partial)
    per_seed = {str(s): seed_summary(s, raw[s], work_dir) for s in seeds}
    thresholds = {r["hotflip.json"]["success_threshold"] for r in raw.values() if "hotflip.json" in r}
    final = {"preset": preset, "seeds": seeds, "partial": bool(missing),
             "missing": {str(s): m for s, m in missing.items()},
             "success_threshold": thresholds.pop() if len(thresholds) == 1 else None,
             "per_seed": per_seed, "across_seeds": across_seeds(per_seed)}
    out = work_dir / "final"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "final_results.json", final)
    atomic_write_text(out / "results.md", markdown(final))
    atomic_write_text(out / "table.tex", latex(final))
    written = plots(final, out)
    print(screen_summary(final, out / "results.md"))
    return [str(out / n) for n in ("final_results.json", "results.md", "table.tex")] + [str(p) for p in written]
