"""Did each attack converge? Its best-so-far damage against the forward passes it spent.

Every search records a trace [[forward passes, best objective so far], ...] (utils.attacks.core.Trace):
per text for HotFlip, GCG, GCG with the surrogate gradient and random search; per restart for UAT (its
damage on the optimisation texts); per text and radius for PGD (gradient passes). A trace is a step
function: its value at budget b is the last point at or before b (the search's best so far).

Plateau: the damage a search gained over the second half of its own budget, per unit (text or UAT
restart): value(B) - value(B / 2). Its mean across seeds and units carries a hierarchical-bootstrap
interval; relative to value(B / 2) it is what doubling the budget from B / 2 added. An attack has
plateaued on an arm when that relative gain is below PLATEAU_GAIN; a comparison on an attack that has
not is flagged in the report (more budget could change it).

HotFlip is the exception: its trace runs over its flips, and the number of flips is the threat model
(attack.hotflip_max_flips), not a budget the search may exceed; B/2 is about half the allowed flips.
Its curve and gain are reported (what the last flips add) and `plateaued` is None: whether its search
is wide enough is a question of attack.hotflip_top_k, answered by rerunning at a larger width.

UAT's beam search stops after the first sweep that gains nothing (or at attack.uat_max_sweeps): a
restart that stopped so is at its search's fixed point, and more sweeps add exactly 0, however much its
earlier sweeps gained. Its `plateaued` is therefore whether every restart stopped on its own
(`restarts_stopped`), not the trace rule; the gain over the last half is still reported.
"""
from __future__ import annotations

import numpy as np

from utils.results.statistics import bootstrap_summary, hierarchical_bootstrap, mean_of_seeds

PLATEAU_GAIN = 0.05              # doubling the budget adds under 5% damage
GRID_POINTS = 25
SEARCHES = ("hotflip", "gcg", "gcg_surrogate", "random_search", "uat")


def value_at(trace: list[list[float]], budget: float) -> float:
    """The best objective a search had reached after `budget` forward passes (0 before its first point)."""
    best = 0.0
    for spent, value in trace:
        if spent > budget:
            break
        best = value
    return best


def units(raw: dict, attack: str) -> list[dict[str, list[list[list[float]]]]]:
    """Per seed, {arm: [trace of each text (or UAT restart)]}."""
    out = []
    for files in raw.values():
        res = files.get(f"{attack}.json")
        if not res:
            continue
        if attack == "uat":
            per = {arm: [r["trace"] for r in m.get("restarts", []) if r.get("trace")] for arm, m in res["models"].items()}
        else:
            per = {arm: [r["trace"] for r in m["examples"] if r.get("trace")] for arm, m in res["models"].items()}
        if any(per.values()):
            out.append({arm: t for arm, t in per.items() if t})
    return out


def arm_curve(per_seed: list[list[list]], n_boot: int) -> dict:
    """One arm's curve on a common grid of budgets, and its gain over the last half of the budget."""
    budget = max(t[-1][0] for s in per_seed for t in s)
    grid = np.linspace(0, budget, GRID_POINTS)
    seeds = [{**{f"g{i}": [value_at(t, b) for t in s] for i, b in enumerate(grid)},
              "gain": [value_at(t, t[-1][0]) - value_at(t, t[-1][0] / 2) for t in s],
              "half": [value_at(t, t[-1][0] / 2) for t in s]} for s in per_seed]
    est, draws = hierarchical_bootstrap(seeds, lambda slots: np.stack(
        [np.mean([s[f"g{i}"] for s in slots], axis=0) for i in range(len(grid))], axis=-1), n_boot=n_boot)
    lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
    g_est, g_draws = hierarchical_bootstrap(seeds, mean_of_seeds("gain"), n_boot=n_boot, seed=1)
    half = float(np.mean([np.mean(s["half"]) for s in seeds]))
    gain = bootstrap_summary(float(g_est), g_draws)
    relative = gain["mean"] / half if half > 0 else None
    # What doubling adds at smaller budgets (b -> 2b, b = B/8, B/4, B/2 of each unit's own budget B): the
    # smallest b where it adds under PLATEAU_GAIN is where the curve flattens (None: not within B).
    doubling = []
    for frac in (0.125, 0.25, 0.5):
        at = [np.mean([value_at(t, t[-1][0] * frac) for t in s]) for s in per_seed]
        twice = [np.mean([value_at(t, t[-1][0] * 2 * frac) for t in s]) for s in per_seed]
        base = float(np.mean(at))
        doubling.append({"fraction_of_budget": frac, "damage": base, "doubled": float(np.mean(twice)),
                         "relative_gain": float(np.mean(twice)) / base - 1 if base > 0 else None})
    flat = [d["fraction_of_budget"] for d in doubling if d["relative_gain"] is not None and d["relative_gain"] < PLATEAU_GAIN]
    return {"budget": float(budget), "grid": grid.tolist(), "mean": np.asarray(est).tolist(),
            "doubling": doubling, "plateau_fraction_of_budget": min(flat) if flat else None,
            "ci95": [[float(a), float(b)] for a, b in zip(lo, hi)], "n_seeds": len(per_seed),
            "n_units": sum(len(s) for s in per_seed), "damage_at_half": half,
            "gain_last_half": {"mean": gain["mean"], "ci95": gain["ci95"]},
            "relative_gain_last_half": relative,
            "plateaued": relative is not None and relative < PLATEAU_GAIN}


def convergence(raw: dict, n_boot: int = 500) -> dict:
    """{attack: {arm: arm_curve}} for every search with traces; the unit is the text (UAT: the restart)."""
    out = {}
    for attack in SEARCHES:
        per_seed = units(raw, attack)
        arms = sorted({a for s in per_seed for a in s})
        curves = {arm: arm_curve([s[arm] for s in per_seed if arm in s], n_boot) for arm in arms}
        if attack == "hotflip":
            for r in curves.values():
                r["plateaued"] = None
        if attack == "uat" and _beam_uat(raw):
            for arm, r in curves.items():
                stopped = [len(t) < 2 or t[-1][1] - t[-2][1] <= 1e-6 for s in per_seed for t in s.get(arm, [])]
                r["restarts_stopped"] = [sum(stopped), len(stopped)]
                r["plateaued"] = all(stopped)
        if curves:
            out[attack] = {"unit": "restart" if attack == "uat" else "text",
                           "x": "forward passes of the search (per text; UAT: per restart, over its optimisation texts)",
                           "y": "best damage so far (mean NLL increase, nats/token" +
                                ("; optimisation texts" if attack == "uat" else "") + ")",
                           "arms": curves}
    return out


def _beam_uat(raw: dict) -> bool:
    return all(f["uat.json"].get("config", {}).get("uat_search", "beam") == "beam" for f in raw.values() if "uat.json" in f)


def not_plateaued(conv: dict) -> dict[str, list[str]]:
    """{attack: [arms where it had not plateaued]} (only attacks with such arms; HotFlip never: None)."""
    return {attack: bad for attack, c in conv.items()
            if (bad := [arm for arm, r in c["arms"].items() if r["plateaued"] is False])}
