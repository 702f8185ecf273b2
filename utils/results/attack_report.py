"""results.md's attack-strength sections: the worst case per arm, convergence with the plateau flags the
verdict tables carry, the gradient-masking checks, PGD and UAT restarts (the numbers: utils/results/
convergence.py, attack_checks.py)."""
from __future__ import annotations

from configs.experiment_config import WORST_CASE_SEARCHES
from utils.results.convergence import PLATEAU_GAIN, not_plateaued
from utils.results.formatting import ARM_NAMES, ATTACK_NAMES, arms_present, fmt


PLATEAUED = {True: "yes", False: "NO", None: "n/a (flips: the threat model)"}


def _plateau_cells(r: dict) -> str:
    """'Plateaued | Doubling adds under 5% from' of one convergence row."""
    said = PLATEAUED[r["plateaued"]]
    if "restarts_stopped" in r:
        said += f" ({r['restarts_stopped'][0]} of {r['restarts_stopped'][1]} restarts stopped)"
    if r["plateaued"] is None:
        return f"{said} | n/a"
    frac = r.get("plateau_fraction_of_budget")
    return f"{said} | {f'{frac:g} B' if frac else 'not within B'}"


def before_plateau(final: dict) -> dict[str, list[str]]:
    """{search: [arms on which it had not plateaued]} (stage 7's convergence check)."""
    return not_plateaued(final["across_seeds"].get("convergence", {}))


def plateau_flag(final: dict, measure: str) -> str:
    """' (before the plateau: ...)' for a measure whose searches had not converged on some arm."""
    searches = WORST_CASE_SEARCHES if measure.startswith("worst") else \
        [a for a in ("gcg_surrogate", "random_search", "hotflip", "gcg", "uat") if measure.startswith(a)][:1]
    bad = before_plateau(final)
    hit = [f"{ATTACK_NAMES[a]} on {', '.join(ARM_NAMES[x] for x in bad[a])}" for a in searches if a in bad]
    return f" (before the plateau: {'; '.join(hit)})" if hit else ""


def attack_strength(final: dict) -> list[str]:
    """Worst case per arm, convergence, gradient-masking checks, PGD and UAT restarts (utils/results/
    convergence.py, attack_checks.py)."""
    acr, arms = final["across_seeds"], arms_present(final)
    lines = ["", "## Worst case per text (the threat model's most damaging search per text)", "",
             "Per text attacked by HotFlip, GCG and random search, the record of largest dNLL; each arm's robustness "
             "is this worst case first. Every arm gets the same three searches: GCG through the surrogate gradient "
             "(a fourth search on the clamped arms only) is the gradient-masking check below, not part of it.", "",
             "| Model | Worst-case success | Worst-case dNLL | Texts won by |", "|---|---|---|---|"]
    for arm in arms:
        a = acr["arms"][arm]
        won = acr.get("worst_won_by", {}).get(arm, {})
        lines.append(f"| {ARM_NAMES[arm]} | {fmt(a.get('worst_success_rate'), 100, 1, True)} | "
                     f"{fmt(a.get('worst_mean_abs_delta_nll'), 1, 3)} | "
                     + ", ".join(f"{ATTACK_NAMES[n]} {c}" for n, c in won.items() if c) + " |")
    conv = acr.get("convergence", {})
    if conv:
        lines += ["", "## Convergence (best damage so far against forward passes; attack_convergence.png)", "",
                  "Gain over the last half of each search's budget: damage(B) - damage(B/2) per text (UAT: per restart, "
                  "optimisation texts), mean [hierarchical bootstrap 95% CI]; plateaued when doubling the budget from B/2 "
                  f"added under {PLATEAU_GAIN:.0%}. Comparisons on a search that had not plateaued are flagged in the tables above. "
                  "HotFlip's trace runs over its flips, which the threat model bounds: its gain is what the last flips add, "
                  "and whether its search is wide enough is a rerun at a larger attack.hotflip_top_k. UAT's beam search stops "
                  "after a sweep without gain: it has plateaued when every restart stopped so (more sweeps add exactly 0), "
                  "not by the trace rule.", "",
                  "| Search | Model | Budget (forward passes) | Damage at B/2 | Gain over last half [95% CI] | Relative | Plateaued "
                  f"| Doubling adds under {PLATEAU_GAIN:.0%} from |", "|---|---|---|---|---|---|---|---|"]
        for attack, c in conv.items():
            for arm in (x for x in arms if x in c["arms"]):
                r = c["arms"][arm]
                g, rel = r["gain_last_half"], r["relative_gain_last_half"]
                lines.append(f"| {ATTACK_NAMES[attack]} | {ARM_NAMES[arm]} | {r['budget']:,.0f} | {r['damage_at_half']:.3f} | "
                             f"{g['mean']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] | "
                             f"{'n/a' if rel is None else f'{100 * rel:+.1f}%'} | {_plateau_cells(r)} |")
    mask = acr.get("masking", {})
    if mask:
        lines += ["", "## Gradient masking checks", "",
                  "Below clamp: the fraction of MLP inputs under x* = -0.7518 (where the monotone GELU's gradient is 0; "
                  "'no clamp': exact GELU, only small there), on the attacked and on the worst-case adversarial texts. "
                  "Surrogate - GCG: GCG through exact GELU's derivative (BPDA) minus plain GCG, per text; > 0 on a clamped "
                  "arm means its own gradient hid damage. Random - GCG: random search with GCG's forward budget minus GCG; "
                  ">= 0 means the gradient did not guide the search. Transfer - white box: per text, the damage "
                  "on this arm of the texts crafted on the unconstrained arm that transfers best (named), minus the "
                  "arm's own white-box damage; > 0 means another model's gradient found more than the arm's own "
                  "(masking). Gradient fidelity: per text, Spearman's rho between the first-order gain (e_b - e_a) . "
                  "grad and the exact gain of random search's uniformly drawn first-step swaps, on the same targets; "
                  "near 0 means the arm's gradient predicts nothing, so its gradient-guided damage says little.", "",
                  "| Model | Clamp | Below clamp (clean, adversarial) | Surrogate - GCG dNLL [95% CI] | Random - GCG dNLL "
                  "[95% CI] | Transfer - white box, HotFlip | Transfer - white box, GCG | Gradient fidelity (rho) |",
                  "|---|---|---|---|---|---|---|---|"]

        def transfer(d):
            return "n/a" if d is None else f"{fmt(d, 1, 3)} (from {ARM_NAMES[d['source']]})"
        for arm in (x for x in arms if x in mask):
            m = mask[arm]
            below = (f"{100 * m['below_clamp_clean']:.2f}%, {100 * m['below_clamp_adversarial']:.2f}%"
                     if "below_clamp_clean" in m else "n/a")
            lines.append(f"| {ARM_NAMES[arm]} | {'flat' if m.get('flat_region') else 'no clamp'} | {below} | "
                         f"{fmt(m.get('surrogate_minus_gcg'), 1, 3)} | {fmt(m.get('random_minus_gcg'), 1, 3)} | "
                         f"{transfer(m.get('transfer_minus_white_box_hotflip'))} | "
                         f"{transfer(m.get('transfer_minus_white_box_gcg'))} | {fmt(m.get('gradient_fidelity'), 1, 2)} |")
        rank = acr.get("surrogate_ranking")
        if rank:
            lines += ["", "Arms by GCG dNLL, most damaged first: " + ", ".join(ARM_NAMES[a] for a in rank["order"]["gcg_mean_abs_delta_nll"])
                      + ". Through the surrogate: " + ("the same order." if not rank["changed"] else ", ".join(
                          ARM_NAMES[a] for a in rank["order"]["gcg_surrogate_mean_abs_delta_nll"]) + "; swapped: " + "; ".join(
                          f"{ARM_NAMES[p['arms'][0]]} and {ARM_NAMES[p['arms'][1]]} (GCG {p['gcg_mean_abs_delta_nll'][0]:.3f} vs "
                          f"{p['gcg_mean_abs_delta_nll'][1]:.3f}, surrogate {p['gcg_surrogate_mean_abs_delta_nll'][0]:.3f} vs "
                          f"{p['gcg_surrogate_mean_abs_delta_nll'][1]:.3f}"
                          + (", intervals overlap)" if p["intervals_overlap"] else ")") for p in rank["swapped"]) + ".")]
    pgd = acr.get("pgd", {})
    if pgd:
        radii = sorted({r for rows in pgd.values() for r in rows}, key=float)
        lines += ["", "## PGD on the input embeddings (L2 ball per position, radius x mean embedding norm)", "",
                  "The damage PGD's search found: a lower bound on the worst case inside each ball, not an upper bound "
                  "on what any input change can do. In brackets after each cell, the radius in token swaps: over the "
                  "median distance from a token's embedding to its nearest other token's (below 1, the ball holds no "
                  "swap of that token, so this is outside the token threat model).", "",
                  "| Model | " + " | ".join(f"dNLL at r = {r}" for r in radii) + " |", "|---|" + "---|" * len(radii)]
        for arm in (x for x in arms if x in pgd):
            lines.append(f"| {ARM_NAMES[arm]} | " + " | ".join(fmt(pgd[arm].get(r), 1, 3) + _in_swaps(pgd[arm].get(r))
                                                              for r in radii) + " |")
    restarts = acr.get("uat_restarts", {})
    if restarts:
        lines += ["", "## UAT restarts (each an independent search; held-out dNLL per restart)", "",
                  "| Model | Restarts | Mean [95% CI: seeds, then restarts] | Range |", "|---|---|---|---|"]
        for arm in (x for x in arms if x in restarts):
            r = restarts[arm]
            lines.append(f"| {ARM_NAMES[arm]} | {r['restarts']} | {fmt(r, 1, 3)} | {r['min']:.3f} to {r['max']:.3f} |")
    return lines


def _in_swaps(cell: dict | None) -> str:
    return f" ({cell['radius_in_swaps']:.2g} swaps)" if cell and "radius_in_swaps" in cell else ""
