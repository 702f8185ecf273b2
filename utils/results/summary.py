"""What a reader sees first: the primary verdict, one row per arm, and where the rest is.

The primary endpoint is fixed before any run (the config's `analysis`, by default the recovered monotone
arm's worst-case dNLL minus the unconstrained frontier at its own clean loss). The console summary and the
head of results.md both lead with it, then give one compact row per arm; the pair tests and the
per-measure tables follow in results.md only.
"""
from __future__ import annotations

from pathlib import Path

from utils.results.attack_report import before_plateau
from utils.results.formatting import ARM_NAMES, arms_present, fmt
from utils.results.frontier import is_unconstrained

PLATEAU_MARK = "†"


def question(arm: str) -> str:
    return (f"Is the model with monotone MLPs ({ARM_NAMES[arm]}) harder to attack than an unconstrained model of the "
            "same clean loss?")


def primary_names(final: dict) -> tuple[str, str]:
    """(measure, arm) of the primary test stage 7 ran."""
    p = final["across_seeds"]["primary"]
    return p["measure"], p["arm"]


def primary(final: dict) -> dict | None:
    """The primary endpoint's residual, with its measure's title and sizes; None where it was not measured."""
    measure, arm = primary_names(final)
    f = final["across_seeds"].get("frontier", {}).get(measure)
    if not f or arm not in f["residuals"]:
        return None
    return {"arm": arm, "title": f["title"], "n_seeds": f["n_seeds"], **f["residuals"][arm]}


def short_verdict(r: dict) -> str:
    """A residual's verdict in a few words (frontier.residual_verdict says it in full)."""
    v = r["verdict"]
    for start, words in (("more robust", "more robust"), ("less robust", "less robust"),
                         ("no difference", "no difference"), ("no matched", "outside the controls' range"),
                         ("no test", "no test (saturated)"), ("no verdict", "no verdict (1 seed)")):
        if v.startswith(start):
            return words
    return v


def estimate(p: dict) -> str:
    """The primary estimate with its interval and n: the seed-level t interval, or with one seed the
    texts-only bootstrap interval, said to be that."""
    t = p["seed_level"]
    if t["p_value"] is None:
        return (f"{p['mean']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] (1 seed x {p['n_texts']} texts; "
                "interval over texts only)")
    return (f"{t['mean']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] (t over {t['n']} seeds x "
            f"{p['n_texts']} texts)")


def power(p: dict) -> str:
    t = p["seed_level"]
    return "" if t["mde80"] is None else f"; the test detects {t['mde80']:.3f} with 80% power at alpha {t['alpha']:g}"


def verdict_sentence(p: dict) -> str:
    """The primary verdict in one sentence: estimate, interval, n, power at the verdict's alpha."""
    return f"{ARM_NAMES[p['arm']]} minus the unconstrained frontier, {p['title']}: {estimate(p)}: {p['verdict']}{power(p)}."


def arm_rows(final: dict) -> list[dict]:
    """Per arm: clean perplexity, worst-case dNLL and success, its residual and verdict (constrained arms),
    and whether a search had not plateaued on it."""
    measure, primary_arm = primary_names(final)
    fr = final["across_seeds"].get("frontier", {}).get(measure, {})
    stalled = {arm for arms in before_plateau(final).values() for arm in arms}
    rows = []
    for arm in arms_present(final):
        a, r = final["across_seeds"]["arms"][arm], fr.get("residuals", {}).get(arm)
        if r and arm == primary_arm and r["seed_level"]["ci95"]:      # the primary test's own interval
            r = {**r, "mean": r["seed_level"]["mean"], "ci95": r["seed_level"]["ci95"]}
        rows.append({"arm": arm, "name": ARM_NAMES[arm] + (" *" if a.get("shared") else ""),
                     "perplexity": a.get("perplexity", {}).get("mean"), "worst": a.get("worst_mean_abs_delta_nll"),
                     "success": a.get("worst_success_rate"), "residual": r,
                     "verdict": short_verdict(r) if r else "frontier" if arm in fr.get("unconstrained_arms", ()) else
                     "not in the frontier" if is_unconstrained(arm) and fr else "",
                     "mark": PLATEAU_MARK if arm in stalled else ""})
    return rows


def bracket_line(final: dict) -> str | None:
    """Whether stage 3's ladder bracketed the monotone arm's validation loss, over the seeds that have one."""
    ladders = {seed: s["ladder"] for seed, s in final["per_seed"].items() if s.get("ladder")}
    if not ladders:
        return None
    missed = [seed for seed, lad in ladders.items() if not lad["bracketed"]]
    return (f"Same-history controls (stage 3's ladder and unconstrained from init) bracket the monotone arm's "
            f"validation loss in {len(ladders) - len(missed)} of {len(ladders)} seed(s)"
            + (f"; not in seed(s) {', '.join(missed)}" if missed else "") + ".")


def _cells(row: dict) -> tuple[str, str, str, str]:
    ppl = "n/a" if row["perplexity"] is None else f"{row['perplexity']:.1f}"
    success = row["success"]
    rate = "n/a" if not success or success.get("mean") is None else f"{100 * success['mean']:.0f}%"
    r = row["residual"]
    residual = f"{r['mean']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r else ""
    return ppl, fmt(row["worst"], 1, 3), rate, residual


def markdown_head(final: dict, figure: str) -> list[str]:
    """results.md's opening: the question, the verdict with its interval and power, the figure, then one
    compact row per arm (plateau flags as footnote marks, explained once under the table)."""
    p = primary(final)
    answer = verdict_sentence(p) if p else (f"not measured: {ARM_NAMES[primary_names(final)[1]]} on "
                                            f"{primary_names(final)[0]} needs that arm and two unconstrained arms attacked.")
    lines = [f"**Question.** {question(primary_names(final)[1])}", "", f"**Answer (primary endpoint).** {answer}", "",
             f"**Figure.** [{figure}]({figure}): the primary measure against clean loss, the unconstrained frontier, "
             "every arm per seed.", "",
             "| Arm | Clean ppl | Worst-case dNLL [95% CI] | Worst-case success | Residual from frontier [95% CI] "
             "| Verdict |", "|---|---|---|---|---|---|"]
    rows = arm_rows(final)
    for row in rows:
        ppl, worst, rate, residual = _cells(row)
        lines.append(f"| {row['name']}{row['mark']} | {ppl} | {worst} | {rate} | {residual} | {row['verdict']} |")
    notes = ["Clean ppl: perplexity on held-out text; dNLL in nats/token; worst case: per text the most damaging of "
             "HotFlip, GCG and random search (the same three for every arm). Residual and verdict: the primary measure's "
             "(the seed-level test for the primary arm, Holm-adjusted for the others), named only inside the "
             "controls' clean-loss range; frontier: an unconstrained arm that defines it (analysis.frontier)."]
    if any(r["mark"] for r in rows):
        notes.append(f"{PLATEAU_MARK} a search had not reached its plateau on this arm: more budget could change "
                     "its numbers (Convergence, below).")
    if any(r["name"].endswith("*") for r in rows):
        notes.append("* the same model in every seed.")
    if bracket_line(final):
        notes.append(bracket_line(final))
    return lines + [""] + [" ".join(notes), ""]


def screen_summary(final: dict, report: Path, figure: Path) -> str:
    """The console's summary: the primary verdict first, one line per arm, the report's and figure's paths
    (at most 25 lines of at most 120 characters)."""
    p = primary(final)
    lines = [f"Monotone MLPs vs. adversarial attacks: {final['preset']}, seeds "
             f"{', '.join(map(str, final['seeds']))}{' (PARTIAL)' if final['partial'] else ''}"]
    if p:
        lines += [f"PRIMARY  {ARM_NAMES[p['arm']]} minus the unconstrained frontier, {p['title']}:",
                  f"         {estimate(p)}: {short_verdict(p)}"
                  + ("" if p["seed_level"]["mde80"] is None else f" (detects {p['seed_level']['mde80']:.3f} at 80% power)")]
    else:
        lines.append(f"PRIMARY  not measured: {ARM_NAMES[primary_names(final)[1]]} on {primary_names(final)[0]} needs "
                     "that arm and two unconstrained arms attacked")
    lines.append(f"{'arm':<27}{'clean ppl':>10}  {'worst-case dNLL [95% CI]':<25}{'success':>8}  verdict")
    rows = arm_rows(final)
    for row in rows:
        ppl, worst, rate, _ = _cells(row)
        lines.append(f"{(ARM_NAMES[row['arm']] + row['mark'])[:26]:<27}{ppl:>10}  {worst:<25}{rate:>8}  {row['verdict']}")
    if any(r["mark"] for r in rows):
        lines.append(f"{PLATEAU_MARK} a search had not plateaued on this arm (results.md: Convergence)")
    if bracket_line(final):
        lines.append(bracket_line(final).replace("Same-history controls (stage 3's ladder and unconstrained from "
                                                 "init)", "Ladder + unconstrained from init"))
    return "\n".join([line[:120] for line in lines] + [f"report: {report}", f"figure: {figure}"])   # paths whole
