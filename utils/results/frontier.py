"""Robustness against clean loss: is a constrained arm harder to attack than an unconstrained model
of the same clean loss?

Attack damage follows clean loss (a better model has more to lose), so comparing a monotone arm
with a baseline of different perplexity confounds the two. Unconstrained arms trace a frontier: per
measure, an isotonic fit of each seed's damage against its clean NLL on the attacked texts. Which
arms (AnalysisConfig.frontier): by default those of the monotone arm's own history (stage 3's
ladder and unconstrained_from_init: its damaged start trained without the constraint) and the
baseline; or every unconstrained arm (the pretrained model, stage 0's controls). A constrained arm's
residual is its damage minus the frontier at its own clean NLL; the hierarchical bootstrap
(seeds, then texts) refits the frontier in every draw, so the residual's interval carries the
frontier's uncertainty too. The verdict names an arm more (less) robust only where that interval
excludes 0 and the arm's clean NLL lies inside the controls' range (no extrapolation).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import isotonic_regression

from utils.results.statistics import (bootstrap_summary, hierarchical_bootstrap, holm, mde, mean_of_seeds,
                                      seed_level_test)

CONSTRAINED = ("monotonic_init", "monotonic")     # the arms with a monotonicity certificate
# measure -> (result file, per-text value from a record, title); every record also has clean_nll
MEASURES = {
    "worst_abs_delta_nll": ("worst_case", lambda r, t: r["abs_delta_nll"], "Worst-case dNLL (HotFlip, GCG, random search)"),
    "worst_success": ("worst_case", lambda r, t: float(r["success"]), "Worst-case success (relative)"),
    "worst_success_abs": ("worst_case", lambda r, t: float(r["abs_delta_nll"] > t), "Worst-case success (absolute)"),
    "hotflip_abs_delta_nll": ("hotflip", lambda r, t: r["abs_delta_nll"], "HotFlip dNLL"),
    "hotflip_success": ("hotflip", lambda r, t: float(r["success"]), "HotFlip success (relative)"),
    "hotflip_success_abs": ("hotflip", lambda r, t: float(r["abs_delta_nll"] > t), "HotFlip success (absolute)"),
    "gcg_abs_delta_nll": ("gcg", lambda r, t: r["abs_delta_nll"], "GCG dNLL"),
    "gcg_success": ("gcg", lambda r, t: float(r["success"]), "GCG success (relative)"),
    "gcg_success_abs": ("gcg", lambda r, t: float(r["abs_delta_nll"] > t), "GCG success (absolute)"),
    "gcg_surrogate_abs_delta_nll": ("gcg_surrogate", lambda r, t: r["abs_delta_nll"], "GCG (surrogate gradient) dNLL"),
    "random_search_abs_delta_nll": ("random_search", lambda r, t: r["abs_delta_nll"], "Random search dNLL"),
    "uat_abs_delta_nll": ("uat", lambda r, t: r["triggered_nll"] - r["clean_nll"], "UAT dNLL"),
}


def is_unconstrained(arm: str) -> bool:
    return arm not in CONSTRAINED


def fits_frontier(arm: str, which: str) -> bool:
    """Whether an arm is one of the points the frontier is fitted to (AnalysisConfig.frontier): same_history, the
    recoveries of the monotone arm's kind (the ladder, unconstrained_from_init, the baseline); all, every
    unconstrained arm (stage 0's controls and the pretrained model too)."""
    if which == "all":
        return is_unconstrained(arm)
    return arm in ("baseline", "unconstrained_from_init") or arm.startswith("ladder_")


def measure_texts(raw: dict, measure: str, abs_nats: float) -> list[dict]:
    """Per seed (that has the measure), {arm: {"clean": [...], "value": [...]}} on the texts every arm
    of that seed was attacked on, in document order (so arms are paired text by text)."""
    attack, value, _ = MEASURES[measure]
    out = []
    for files in raw.values():
        res = files.get(f"{attack}.json")
        if not res:
            continue
        by_arm = {arm: {r["doc"]: r for r in m["examples"]} for arm, m in res["models"].items()}
        docs = sorted(set.intersection(*(set(d) for d in by_arm.values())))
        out.append({arm: {"clean": [recs[d]["clean_nll"] for d in docs],
                          "value": [value(recs[d], abs_nats) for d in docs]} for arm, recs in by_arm.items()})
    return out


def _flat(per_seed: list[dict]) -> list[dict[str, list]]:
    """{arm: {clean, value}} per seed as {"arm/clean": ..., "arm/value": ...} (the bootstrap's named arrays)."""
    return [{f"{arm}/{k}": v for arm, d in s.items() for k, v in d.items()} for s in per_seed]


def fit_direction(x: np.ndarray, y: np.ndarray) -> bool:
    """True if damage rising with clean NLL fits the points better (least squares) than falling."""
    order = np.argsort(x, kind="stable")
    sse = {inc: float(((isotonic_regression(y[order], increasing=inc).x - y[order]) ** 2).sum()) for inc in (True, False)}
    return sse[True] <= sse[False]


def isotonic_fit(x: np.ndarray, y: np.ndarray, increasing: bool):
    """The monotone least-squares fit of y on x, as a function: linear between the fitted points,
    constant beyond them (np.interp)."""
    order = np.argsort(x, kind="stable")
    xs, fitted = x[order], isotonic_regression(y[order], increasing=increasing).x
    return lambda at: np.interp(at, xs, fitted)


def _points(seeds: list[dict], arms: list[str]) -> tuple[np.ndarray, np.ndarray]:
    pts = [(s[f"{a}/clean"], s[f"{a}/value"]) for s in seeds for a in arms if f"{a}/clean" in s]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def frontier(raw: dict, measure: str, abs_nats: float, n_boot: int = 1000, seed: int = 0,
             which: str = "all") -> dict | None:
    """The frontier of one measure, fitted to the arms `which` names (fits_frontier), and every constrained
    arm's residual from it; None without data."""
    per_seed = measure_texts(raw, measure, abs_nats)
    if not per_seed:
        return None
    arms = sorted({a for s in per_seed for a in s})
    free = [a for a in arms if fits_frontier(a, which) and all(a in s for s in per_seed)]
    tested = [a for a in arms if not is_unconstrained(a) and all(a in s for s in per_seed)]
    if len(free) < 2 or not tested:
        return None
    flat = _flat(per_seed)
    x, y = _points([{k: float(np.mean(v)) for k, v in s.items()} for s in flat], free)
    increasing = fit_direction(x, y)

    def residuals(slots: list[dict]) -> np.ndarray:
        """Per draw: refit the frontier on that draw's unconstrained points, then each tested arm's mean residual."""
        out = np.empty((len(slots[0][f"{free[0]}/clean"]), len(tested)))
        for b in range(len(out)):
            seeds = [{k: v[b] for k, v in s.items()} for s in slots]
            f = isotonic_fit(*_points(seeds, free), increasing)
            out[b] = [np.mean([s[f"{a}/value"] - f(s[f"{a}/clean"]) for s in seeds]) for a in tested]
        return out

    estimate, draws = hierarchical_bootstrap(flat, residuals, n_boot=n_boot, seed=seed)
    curve = isotonic_fit(x, y, increasing)
    grid = np.linspace(x.min(), x.max(), 50)
    out = {"measure": measure, "title": MEASURES[measure][2], "fit": f"isotonic ({'increasing' if increasing else 'decreasing'} "
           "in clean NLL; least squares over every unconstrained arm and seed, linear between fitted points)",
           "unconstrained_arms": free, "frontier_arms": which, "n_seeds": len(per_seed), "clean_nll_range": [float(x.min()), float(x.max())],
           "curve": {"clean_nll": grid.tolist(), "damage": curve(grid).tolist()},
           "points": {a: [[float(np.mean(s[a]["clean"])), float(np.mean(s[a]["value"]))] for s in per_seed]
                      for a in arms if all(a in s for s in per_seed)},
           "residuals": {}}
    for i, arm in enumerate(tested):
        clean = float(np.mean([np.mean(s[arm]["clean"]) for s in per_seed]))
        r = bootstrap_summary(estimate[i], draws[:, i])
        r.update(clean_nll=clean, inside_range=bool(x.min() <= clean <= x.max()),
                 nearest_control=nearest_control(per_seed, arm, free, n_boot, seed),
                 n_texts=round(float(np.mean([len(s[arm]["value"]) for s in per_seed]))),
                 seed_level=seed_level_test(seed_residuals(per_seed, arm, free, increasing)))
        r["verdict"] = residual_verdict(r)
        out["residuals"][arm] = r
    return out


def seed_residuals(per_seed: list[dict], arm: str, free: list[str], increasing: bool) -> list[float]:
    """Per seed, the arm's mean damage minus that seed's own frontier (its unconstrained arms alone) at the
    arm's mean clean NLL: one value per seed, independent across seeds (the primary test's unit)."""
    out = []
    for s in per_seed:
        x = np.array([np.mean(s[a]["clean"]) for a in free])
        y = np.array([np.mean(s[a]["value"]) for a in free])
        out.append(float(np.mean(s[arm]["value"]) - isotonic_fit(x, y, increasing)(np.mean(s[arm]["clean"]))))
    return out


def adjust_secondary(frontiers: dict, primary: tuple[str, str], alpha: float = 0.05) -> None:
    """Holm over every residual but the primary one (the secondary family), in place: each gains p_holm and
    an MDE at Holm's first-step alpha (alpha / m), and its verdict is taken at the adjusted p. The primary
    endpoint is tested alone, at alpha, across seeds (`seed_level`)."""
    family = {(m, a): r["p_value"] for m, f in frontiers.items() for a, r in f["residuals"].items()
              if (m, a) != primary and r.get("p_value") is not None}
    adjusted = holm(family)
    for (m, a), p in adjusted.items():
        r = frontiers[m]["residuals"][a]
        r.update(p_holm=p, family_size=len(family), mde80=mde(r["se"], alpha / len(family)),
                 mde_alpha=alpha / len(family))
        r["verdict"] = residual_verdict(r, alpha)


def residual_verdict(r: dict, alpha: float = 0.05) -> str:
    """The rule: named only where the test rejects 0 (at the Holm-adjusted p once `adjust_secondary` ran,
    else where the 95% interval excludes 0) and the arm lies inside the controls' clean-loss range."""
    if not r["inside_range"]:
        return ("no matched verdict: its clean NLL lies outside the unconstrained arms' range "
                "(the frontier would be extrapolated)")
    if not r["se"] > 0:
        return "no test: the measure does not vary in any draw (saturated, e.g. every text succeeds), so it says nothing"
    lo, hi = r["ci95"]
    if "p_holm" in r:
        more, less = r["p_holm"] < alpha and r["mean"] < 0, r["p_holm"] < alpha and r["mean"] > 0
    else:
        more, less = hi < 0, lo > 0
    if more:
        return "more robust than an unconstrained model of the same clean loss"
    if less:
        return "less robust than an unconstrained model of the same clean loss"
    return f"no difference detected (this test detects a residual of about {r['mde80']:.3g} at 80% power)"


def primary_verdict(r: dict, alpha: float = 0.05) -> str:
    """The primary endpoint's verdict: the seed-level test (seed as the unit), inside the controls' range."""
    t = r["seed_level"]
    if not r["inside_range"]:
        return residual_verdict(r)
    if t["p_value"] is None:
        return f"no verdict: {t['n']} seed; the primary test's unit is the seed (run 3 or more)"
    if t["p_value"] < alpha:
        return ("more" if t["mean"] < 0 else "less") + " robust than an unconstrained model of the same clean loss"
    return f"no difference detected (this test detects a residual of about {t['mde80']:.3g} at 80% power)"


def nearest_control(per_seed: list[dict], arm: str, free: list[str], n_boot: int, seed: int) -> dict:
    """Paired comparison with, in each seed, the unconstrained arm of the closest clean NLL on the same texts."""
    chosen = [min(free, key=lambda a: abs(np.mean(s[a]["clean"]) - np.mean(s[arm]["clean"]))) for s in per_seed]
    diffs = [{"d": np.subtract(s[arm]["value"], s[c]["value"]), "dc": np.subtract(s[arm]["clean"], s[c]["clean"])}
             for s, c in zip(per_seed, chosen)]
    estimate, draws = hierarchical_bootstrap(diffs, mean_of_seeds("d"), n_boot=n_boot, seed=seed + 1)
    return {"controls": chosen, "clean_nll_gap": float(np.mean([d["dc"].mean() for d in diffs])),
            "difference": bootstrap_summary(float(estimate), draws),
            "unit": "attacked text within seed; seeds then texts resampled"}
