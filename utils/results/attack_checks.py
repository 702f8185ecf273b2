"""Were the attacks strong enough to carry a comparison? Stage 7's checks beside the convergence curves.

  masking       per arm: the fraction of MLP inputs in the clamp's flat region (clean and worst-case
                adversarial texts, mean over layers and seeds), and the paired differences on the same
                texts of GCG through the exact-GELU surrogate minus plain GCG, and of random search minus
                GCG. Surrogate > plain on a constrained arm: the model's own gradient hid damage (gradient
                masking). Random search >= GCG: the gradient did not guide the search there. And per search
                (HotFlip, GCG), the adversarial texts crafted on the unconstrained arm that transfers best, applied
                to this arm, minus this arm's own white-box damage on the same texts: transfer beating white-box
                is the classic masking signal (the arm's own gradient led its search astray). And the gradient's
                fidelity: per text, Spearman's rho between the first-order and the exact gains of random search's
                uniformly drawn first-step swaps (gcg.gradient_fidelity); near 0, the arm's gradient guides nothing.
  pgd           per arm and radius: the damage of PGD on the input embeddings (what its search found: a lower
                bound on the worst case inside the ball), and the radius in token swaps (over the median distance
                from a token's embedding to its nearest other token's: below 1, the ball holds no swap)
  ranking       the arms ordered by mean GCG dNLL and by mean surrogate-GCG dNLL (most damaged first), and
                every pair the surrogate puts the other way round: does BPDA change which arm looks robust?
  uat_restarts  per arm: the held-out damage of every UAT restart (each an independent search), its
                mean and spread across restarts; the reported trigger is the best on the optimisation texts
Intervals: the hierarchical bootstrap (seeds, then texts or restarts within each seed).
"""
from __future__ import annotations

import numpy as np

from utils.results.frontier import is_unconstrained
from utils.results.statistics import bootstrap_summary, hierarchical_bootstrap, mean_of_seeds


def _seed_then_unit(per_seed: list[list[float]], n_boot: int) -> dict:
    """Mean of the seed means, hierarchical-bootstrap interval (seeds, then units within each seed)."""
    est, draws = hierarchical_bootstrap([{"v": v} for v in per_seed], mean_of_seeds("v"), n_boot=n_boot)
    return {**bootstrap_summary(float(est), draws), "n": len(per_seed)}


def _by_doc(res: dict, arm: str) -> dict:
    return {r["doc"]: r["abs_delta_nll"] for r in res["models"][arm]["examples"]}


def paired_difference(raw: dict, first: str, second: str, arm: str, n_boot: int) -> dict | None:
    """Mean per-text dNLL of search `first` minus search `second` on one arm, on the texts both attacked."""
    seeds = []
    for files in raw.values():
        a, b = files.get(f"{first}.json"), files.get(f"{second}.json")
        if a and b and arm in a["models"] and arm in b["models"]:
            x, y = _by_doc(a, arm), _by_doc(b, arm)
            docs = sorted(set(x) & set(y))
            seeds.append({"d": [x[d] - y[d] for d in docs]})
    if not seeds:
        return None
    est, draws = hierarchical_bootstrap(seeds, mean_of_seeds("d"), n_boot=n_boot)
    return {**bootstrap_summary(float(est), draws), "n": len(seeds), "n_texts": sum(len(s["d"]) for s in seeds)}


def transfer_minus_white_box(raw: dict, search: str, arm: str, n_boot: int) -> dict | None:
    """Per text, the damage on `arm` of the adversarial text crafted on the unconstrained source arm whose
    transfer to `arm` is largest on average over the seeds, minus `arm`'s own white-box damage on that text."""
    per_source = {}
    for files in raw.values():
        res = files.get(f"{search}.json")
        if not res or arm not in res["models"] or "transfer" not in res:
            continue
        own = _by_doc(res, arm)
        for src, row in res["transfer"].items():
            per_text = row.get(arm, {}).get("abs_delta_nll_per_text")
            if src == arm or not is_unconstrained(src) or per_text is None:
                continue
            docs = [r["doc"] for r in res["models"][src]["examples"]]
            per_source.setdefault(src, []).append({"d": [t - own[d] for d, t in zip(docs, per_text) if d in own]})
    per_source = {s: seeds for s, seeds in per_source.items() if len(seeds) == len(raw)}
    if not per_source:
        return None
    best = max(per_source, key=lambda s: np.mean([np.mean(x["d"]) for x in per_source[s]]))
    est, draws = hierarchical_bootstrap(per_source[best], mean_of_seeds("d"), n_boot=n_boot)
    return {**bootstrap_summary(float(est), draws), "source": best, "n": len(per_source[best]),
            "n_texts": sum(len(x["d"]) for x in per_source[best])}


def masking(raw: dict, arms: list[str], n_boot: int = 1000) -> dict:
    out = {}
    for arm in arms:
        flat = [f["worst_case.json"]["models"][arm]["flat_region"] for f in raw.values()
                if arm in f.get("worst_case.json", {}).get("models", {})]
        row = {}
        if flat:
            row.update(flat_region=flat[0]["clean"]["flat_region"],
                       below_clamp_clean=float(np.mean([f["clean"]["mean"] for f in flat])),
                       below_clamp_adversarial=float(np.mean([f["adversarial"]["mean"] for f in flat])),
                       below_clamp_per_layer=np.mean([f["clean"]["fraction_below_clamp"] for f in flat], axis=0).tolist())
        for key, (first, second) in (("surrogate_minus_gcg", ("gcg_surrogate", "gcg")),
                                     ("random_minus_gcg", ("random_search", "gcg"))):
            if (d := paired_difference(raw, first, second, arm, n_boot)) is not None:
                row[key] = d
        for search in ("hotflip", "gcg"):
            if (d := transfer_minus_white_box(raw, search, arm, n_boot)) is not None:
                row[f"transfer_minus_white_box_{search}"] = d
        rhos = [[r["gradient_fidelity"]["spearman"] for r in f["random_search.json"]["models"][arm]["examples"]
                 if "gradient_fidelity" in r and np.isfinite(r["gradient_fidelity"]["spearman"])]
                for f in raw.values() if arm in f.get("random_search.json", {}).get("models", {})]
        if any(rhos):
            row["gradient_fidelity"] = {**_seed_then_unit([r for r in rhos if r], n_boot),
                                        "n_texts": sum(map(len, rhos))}
        if row:
            out[arm] = row
    return out


def pgd(raw: dict, arms: list[str], n_boot: int = 1000) -> dict:
    out = {}
    for arm in arms:
        by_radius, swaps = {}, {}
        for files in raw.values():
            res = files.get("pgd.json")
            if res and arm in res["models"]:
                for r in res["models"][arm]["examples"]:
                    by_radius.setdefault(f"{r['radius']:g}", {}).setdefault(files["pgd.json"]["seed"], []).append(r["abs_delta_nll"])
                for radius, v in res["models"][arm].get("radius_in_swaps", {}).items():
                    swaps.setdefault(radius, []).append(v)
        rows = {}
        for radius, per_seed in by_radius.items():
            rows[radius] = _seed_then_unit(list(per_seed.values()), n_boot)
            if swaps.get(radius):        # the radius over the median nearest-token swap distance, mean over seeds
                rows[radius]["radius_in_swaps"] = float(np.mean(swaps[radius]))
        if rows:
            out[arm] = rows
    return out


def uat_restarts(raw: dict, arms: list[str], n_boot: int = 1000) -> dict:
    out = {}
    for arm in arms:
        seeds = [[r["eval"]["abs_delta_nll"] for r in f["uat.json"]["models"][arm].get("restarts", []) if "eval" in r]
                 for f in raw.values() if arm in f.get("uat.json", {}).get("models", {})]
        seeds = [s for s in seeds if s]
        if not seeds:
            continue
        flat = [v for s in seeds for v in s]
        out[arm] = {**_seed_then_unit(seeds, n_boot), "restarts": len(flat),
                    "min": float(min(flat)), "max": float(max(flat)),
                    "unit": "restart within seed (seeds, then restarts resampled)"}
    return out


def ranking(arm_stats: dict, first: str = "gcg_mean_abs_delta_nll",
            second: str = "gcg_surrogate_mean_abs_delta_nll") -> dict | None:
    """The arms by mean damage under two searches (most damaged first) and the pairs whose order differs,
    each with both arms' means and whether their intervals under the second search overlap (a swap
    inside the noise). From across_seeds' per-arm statistics."""
    def measured(stat):
        return bool(stat) and stat.get("mean") is not None and bool(stat.get("ci95"))
    arms = [a for a, s in arm_stats.items() if measured(s.get(first)) and measured(s.get(second))]
    if len(arms) < 2:
        return None
    by = {k: sorted(arms, key=lambda a: -arm_stats[a][k]["mean"]) for k in (first, second)}
    swapped = []
    for i, a in enumerate(by[first]):
        for b in by[first][i + 1:]:
            if by[second].index(a) > by[second].index(b):
                (lo_a, hi_a), (lo_b, hi_b) = arm_stats[a][second]["ci95"], arm_stats[b][second]["ci95"]
                swapped.append({"arms": [a, b], first: [arm_stats[a][first]["mean"], arm_stats[b][first]["mean"]],
                                second: [arm_stats[a][second]["mean"], arm_stats[b][second]["mean"]],
                                "intervals_overlap": bool(lo_a <= hi_b and lo_b <= hi_a)})
    return {"order": by, "swapped": swapped, "changed": bool(swapped)}

