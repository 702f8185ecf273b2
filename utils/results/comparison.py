"""The variants of an ablation grid side by side (WORK/final/comparison.{json,md}).

Reads each variant's stage 7 output (variants/<name>/final/final_results.json), so every number
here is one stage 7 computed from per-example records; what this adds is the per-seed ratio of
the recovered monotone perplexity to the same seed's baseline (t interval over seeds). Variants
share one baseline per seed and recovery_baseline setting (utils/run/grid.py), and each is compared
with its own: the check that variants of one baseline report the same baseline numbers is part of
the output.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from utils.results.statistics import t_interval
from utils.run.grid import find_variants
from utils.run.run_files import PipelineError, atomic_write_text, read_json, write_json

# (key in final_results' per-arm statistics, column title); lower is better for perplexity,
# higher damage means a less robust model.
DAMAGE = (("worst_success_rate", "Worst-case success"), ("worst_mean_abs_delta_nll", "Worst-case dNLL"),
          ("hotflip_success_rate", "HotFlip success"), ("hotflip_mean_abs_delta_nll", "HotFlip dNLL"),
          ("gcg_success_rate", "GCG success"), ("gcg_mean_abs_delta_nll", "GCG dNLL"),
          ("uat_abs_delta_nll", "UAT dNLL"))


SAME_MODEL_RTOL = 1e-5


def _baseline_recipe(vdir: Path, seed: int) -> dict:
    """The recovery_baseline a variant's baseline arm was trained with (its stage 2 config, linked or own)."""
    return read_json(vdir / f"seed_{seed}" / "results" / "config_stage_2_train_baseline.json")["recovery_baseline"]


def _settings(vdir: Path, seed: int) -> dict:
    """The variant's monotone settings as its stage 1 certificate recorded them (init resolved)."""
    cert = read_json(vdir / f"seed_{seed}" / "results" / "monotonicity_certificate.json")
    return {"construction": cert.get("construction"), "init": cert.get("init"), "scope": cert["scope"],
            "activation": cert.get("activation_policy")}


def variant_row(name: str, final: dict, settings: dict) -> dict:
    per_seed, arms = final["per_seed"], final["across_seeds"]["arms"]
    if not {"pretrained", "monotonic_init", "monotonic", "baseline"} <= set(arms):
        raise PipelineError(f"variant {name}: stage 7 found arms {sorted(arms)}; the comparison needs "
                            "pretrained, monotonic_init, baseline and monotonic")
    ratios = [s["arms"]["monotonic"]["perplexity"] / s["arms"]["baseline"]["perplexity"]
              for s in per_seed.values() if "perplexity" in s["arms"].get("monotonic", {})]
    certified = {arm: [s["certificates"][arm]["monotone"] for s in per_seed.values() if arm in s["certificates"]]
                 for arm in ("monotonic_init", "monotonic")}
    return {"name": name, "settings": settings, "seeds": final["seeds"], "partial": final["partial"],
            "certified": {arm: f"{sum(v)}/{len(v)}" for arm, v in certified.items()},
            "all_certified": all(all(v) and v for v in certified.values()),
            "post_constraint_perplexity": arms["monotonic_init"]["perplexity"],
            "recovered_perplexity": arms["monotonic"]["perplexity"],
            "ratio_to_baseline": t_interval(ratios),
            "damage": {k: arms["monotonic"].get(k) for k, _ in DAMAGE},
            "pretrained": {"perplexity": arms["pretrained"]["perplexity"],
                           "damage": {k: arms["pretrained"].get(k) for k, _ in DAMAGE}},
            "baseline": {"perplexity": arms["baseline"]["perplexity"],
                         "per_seed_perplexity": {s: v["arms"]["baseline"]["perplexity"] for s, v in per_seed.items()},
                         "damage": {k: arms["baseline"].get(k) for k, _ in DAMAGE}}}


def compare(work_dir: Path) -> dict:
    variants = find_variants(work_dir)
    if not variants:
        raise PipelineError(f"no variants in {work_dir / 'variants'}: run run_all.sh with --grid first")
    missing = [v.name for v in variants if not (v / "final" / "final_results.json").exists()]
    if missing:
        raise PipelineError(f"no stage 7 results for variant(s) {', '.join(missing)}: run stage 7 in "
                            f"{work_dir / 'variants'}/<name> first")
    rows, recipes = [], {}
    for v in variants:
        final = read_json(v / "final" / "final_results.json")
        rows.append(variant_row(v.name, final, _settings(v, final["seeds"][0])))
        recipes[v.name] = _baseline_recipe(v, final["seeds"][0])
    # One baseline per distinct recovery_baseline: variants that share it must report the same numbers.
    groups = {}
    for r in rows:
        groups.setdefault(json.dumps(recipes[r["name"]], sort_keys=True), []).append(r)
    baselines = []
    for recipe, members in groups.items():
        by_seed = {}
        for r in members:
            for seed, ppl in r["baseline"]["per_seed_perplexity"].items():
                by_seed.setdefault(seed, []).append(ppl)
        # Within float noise: one baseline measured under two code revisions (another batching of the same
        # windows) differs in the 7th digit; two trained baselines differ in the 2nd.
        if any(max(v) - min(v) > SAME_MODEL_RTOL * max(v) for v in by_seed.values()):
            raise PipelineError("variants of one recovery_baseline report different baseline perplexities for the "
                                "same seed, so they did not share one baseline arm: "
                                + str({r["name"]: r["baseline"]["per_seed_perplexity"] for r in members}))
        widest = max(members, key=lambda r: len(r["seeds"]))
        changed = {k: v for k, v in json.loads(recipe).items()
                   if len(groups) > 1 and len({json.dumps(recipes[m["name"]][k]) for m in rows}) > 1}
        name = "baseline" + (" (" + ", ".join(f"{k} {v}" for k, v in changed.items()) + ")" if changed else "")
        baselines.append({"name": name, "variants": [r["name"] for r in members], **widest["baseline"]})
        for r in members:
            r["baseline_name"] = name
    widest = max(rows, key=lambda r: len(r["seeds"]))          # the shared arms over the most seeds
    return {"work_dir": str(work_dir), "preset": read_json(variants[0] / "final" / "final_results.json")["preset"],
            "pretrained": widest["pretrained"], "baselines": baselines, "variants": rows}


def _cell(stat: dict | None, digits: int = 2, percent: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    f = (lambda x: f"{100 * x:.1f}%") if percent else (lambda x: f"{x:.{digits}f}")
    ci = stat.get("ci95")
    return f"{f(stat['mean'])} [{f(ci[0])}, {f(ci[1])}]" if ci and all(map(math.isfinite, ci)) else f(stat["mean"])


def markdown(comp: dict) -> str:
    titles = [t for _, t in DAMAGE]
    lines = [f"# Ablation: monotone variants ({comp['preset']})", "",
             "Each variant is its own run (variants/<name>/) sharing stage 0 and, per seed, one baseline arm. "
             "Means over seeds with 95% intervals: t over seeds, except success rates (Wilson over every "
             "attacked text) and the post-constraint perplexity (one model: bootstrap over documents). "
             "Ratio = recovered monotone perplexity / the same seed's baseline perplexity.", "",
             "| Variant | Certified (init, trained) | Post-constraint ppl | Recovered ppl | Ratio to baseline | "
             + " | ".join(titles) + " |",
             "|" + "---|" * (5 + len(titles))]
    for b in [{"name": "pretrained", **comp["pretrained"]}, *comp["baselines"]]:
        lines.append(f"| {b['name']} (shared) | unconstrained | - | " + _cell(b["perplexity"])
                     + (" | - | " if b["name"] == "pretrained" else " | 1 | ")
                     + " | ".join(_cell(b["damage"][k], 3, "success" in k) for k, _ in DAMAGE) + " |")
    for r in comp["variants"]:
        lines.append(f"| {r['name']}{' (partial)' if r['partial'] else ''} (seeds {len(r['seeds'])}) | "
                     f"{r['certified']['monotonic_init']}, {r['certified']['monotonic']} | "
                     f"{_cell(r['post_constraint_perplexity'], 1)} | {_cell(r['recovered_perplexity'])} | "
                     f"{_cell(r['ratio_to_baseline'], 3)} | "
                     + " | ".join(_cell(r["damage"][k], 3, "success" in k) for k, _ in DAMAGE) + " |")
    lines += ["", "Settings: " + "; ".join(f"{r['name']}: " + ", ".join(f"{k} {v}" for k, v in r["settings"].items())
                                           + f", compared with {r['baseline_name']}" for r in comp["variants"]), ""]
    return "\n".join(lines)


def write_comparison(work_dir: Path) -> list[str]:
    comp = compare(work_dir)
    out = work_dir / "final"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", comp)
    atomic_write_text(out / "comparison.md", markdown(comp))
    print(markdown(comp))
    return [str(out / "comparison.json"), str(out / "comparison.md")]
