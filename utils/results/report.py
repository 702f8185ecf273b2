"""Stage 7's outputs for people: results.md and table.tex (booktabs); the console summary and the
head of results.md: utils/results/summary.py; the PNG plots: utils/results/plots.py."""
from __future__ import annotations

from utils.results.attack_report import attack_strength, plateau_flag
from utils.results.formatting import ARM_NAMES, ORDER, arms_present, fmt
from utils.results.paper_protocol import table as paper_protocol_table
from utils.results.summary import markdown_head, short_verdict

LEAD_FIGURE = "robustness_vs_clean_loss.png"


def _label(final: dict, arm: str) -> str:
    labels = {s["arms"][arm].get("label") for s in final["per_seed"].values() if arm in s["arms"]}
    return ", ".join(sorted(l for l in labels if l))


def _provenance(final: dict) -> list[str]:
    pv = final.get("provenance", {})
    model, data = pv.get("model", {}), pv.get("data", {})
    what = [f"Preset `{final['preset']}`."]
    if model:
        what.append("Model: " + (f"{model['hub_id']} @ {model.get('sha', '?')[:12]}" if model.get("hub_id")
                                 else f"{model.get('source')} {model.get('path', '')}") + ".")
    if data:
        what.append("Data: " + (f"{data['hub_id']} @ {data.get('sha', '?')[:12]}" if data.get("hub_id")
                                else f"{data.get('source')} {data.get('files', '')}") + ".")
    if pv.get("documents"):
        what.append("Documents (train / val / test): " + " / ".join(f"{pv['documents'][s]:,}" for s in
                                                                   ("train", "val", "test")) + ".")
    overlap = pv.get("heldout_overlap")
    if overlap:
        r = next(iter(overlap.values()))
        what.append(f"Held-out near-duplicates of training text (more than {r['threshold']:.0%} of their "
                    f"{r['shingle_tokens']}-token n-grams in the training split): " + ", ".join(
                        f"{s} {o['near_duplicates']} of {o['documents']}" + (" (removed)" if o["removed"] else "")
                        for s, o in overlap.items()) + ".")
    return [" ".join(what), ""]


def _sizes(final: dict) -> str:
    """n of every table: documents, texts and seeds."""
    rows = [r for s in final["per_seed"].values() for r in s["arms"].values()]
    n = lambda k: max((r[k] for r in rows if k in r), default=0)  # noqa: E731
    gcg = f"{n('n_gcg_texts')} GCG texts, " if n("n_gcg_texts") else ""
    return (f"n = {len(final['seeds'])} seed(s); per seed {n('n_documents'):,} test documents (perplexity), "
            f"{n('n_hotflip_texts')} HotFlip texts, {gcg}{n('n_uat_texts')} UAT evaluation texts.")


def _has(final: dict, key: str) -> bool:
    return any(a.get(key, {}).get("mean") is not None for a in final["across_seeds"]["arms"].values())


def attack_cost(final: dict) -> list[str]:
    """Exact forward passes per attacked text, the compute each text search spent (mean over seeds)."""
    rows = [(arm, name, r[f"{name}_forward_passes_per_text"]) for s in final["per_seed"].values()
            for arm, r in s["arms"].items() for name in ("hotflip", "gcg") if f"{name}_forward_passes_per_text" in r]
    if not rows:
        return []
    names = [n for n in ("hotflip", "gcg") if any(n == x for _, x, _ in rows)]
    lines = ["", "## Attack compute (exact forward passes per attacked text, mean over seeds)", "",
             "| Model | " + " | ".join({"hotflip": "HotFlip", "gcg": "GCG"}[n] for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for arm in arms_present(final):
        cells = []
        for n in names:
            v = [c for a, x, c in rows if a == arm and x == n]
            cells.append(f"{sum(v) / len(v):,.0f}" if v else "n/a")
        lines.append(f"| {ARM_NAMES[arm]} | " + " | ".join(cells) + " |")
    return lines


def capability_table(final: dict) -> list[str]:
    """Zero-shot accuracy per task and arm (mean [t interval over seeds]) and the paired test."""
    caps = final["across_seeds"].get("capabilities")
    if not caps:
        return []
    harness = next((s["capability_harness"] for s in final["per_seed"].values() if "capability_harness" in s), "")
    arms = [a for a in ORDER if any(a in row["arms"] for row in caps.values())]
    lines = ["", f"## Capabilities (zero-shot accuracy, {harness}; mean [t-based 95% interval over seeds])", "",
             "Baseline vs monotone: McNemar's exact test on the same examples, pooled over seeds.", "",
             "| Task | " + " | ".join(ARM_NAMES[a] for a in arms) + " | Baseline vs monotone |",
             "|---|" + "---|" * (len(arms) + 1)]
    for task, row in caps.items():
        cells = [fmt(row["arms"][a], 100, 1, True) if a in row["arms"] else "n/a" for a in arms]
        t = row.get("test")
        test = (f"p = {t['p_value']:.3g} (baseline-only {t['only_first']}, monotone-only {t['only_second']}, "
                f"n = {t['n']})") if t else "n/a"
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {test} |")
    return lines


def weight_change_table(final: dict) -> list[str]:
    """Relative |dW| per module group and arm, mean over seeds: what recovery actually changed."""
    runs = [(arm, t) for s in final["per_seed"].values() for arm, t in s["training"].items()
            if t.get("relative_weight_change")]
    if not runs:
        return []
    arms = [a for a in ("baseline", "monotonic") if any(arm == a for arm, _ in runs)]
    groups = [g for g in ("mlp_in", "mlp_out", "attention", "embeddings", "norms", "other")
              if any(g in t["relative_weight_change"] for _, t in runs)]
    frozen = sorted({f"{arm}: only the constrained modules trained" for arm, t in runs if t["trainable"] != "all"})
    lines = ["", "## What recovery changed (relative weight change sum|W1 - W0| / sum|W0| per module group, "
                 "mean over seeds)", ""] + ([f"Ablation: {'; '.join(frozen)}.", ""] if frozen else []) + \
            ["| Group | " + " | ".join(ARM_NAMES[a] for a in arms) + " |", "|---|" + "---|" * len(arms)]
    for g in groups:
        cells = []
        for a in arms:
            vals = [t["relative_weight_change"][g] for arm, t in runs
                    if arm == a and t["relative_weight_change"].get(g) is not None]
            cells.append(f"{100 * sum(vals) / len(vals):.2f}%" if vals else "n/a")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return lines


def matched_control(final: dict) -> list[str]:
    """The verdict the report leads with: each constrained arm against the frontier of unconstrained arms."""
    fr = final["across_seeds"].get("frontier", {})
    if not fr:
        return ["## Matched-control verdict", "", "No frontier: it needs at least two unconstrained arms of the "
                "configured frontier (analysis.frontier) and a constrained one, attacked on the same texts.", ""]
    some = next(iter(fr.values()))
    ladders = {seed: s["ladder"] for seed, s in final["per_seed"].items() if s.get("ladder")}
    lines = ["## Matched-control verdict: robustness at equal clean loss", "",
             f"Per measure, an {some['fit']} of each seed's damage against its clean NLL on the attacked texts, over "
             f"the unconstrained arms ({', '.join(ARM_NAMES[a] for a in some['unconstrained_arms'])}"
             + ("; the monotone arm's own history and the baseline, analysis.frontier=same_history" if
                some.get("frontier_arms") == "same_history" else "") + "). Residual: a "
             "constrained arm's damage minus the frontier at its own clean NLL (negative: less damage than an "
             "unconstrained model of the same clean loss). 95% interval: hierarchical bootstrap (seeds, then texts), "
             "the frontier refitted in each draw. An arm is named only where the interval excludes 0 and its clean NLL "
             f"lies inside the unconstrained range. Absolute success: dNLL > {final['across_seeds']['success_abs_nats']:g} "
             "nats/token. Nearest control: in each seed the unconstrained arm of closest clean NLL, paired on the same texts.", "",
             "| Measure | Arm | Clean NLL | Residual [95% CI] | MDE (80%) | Verdict | Nearest control (clean gap) | "
             "Difference [95% CI], p |", "|---|---|---|---|---|---|---|---|"]
    notes = {}                                  # plateau flag -> its footnote mark
    for f in fr.values():
        flag = plateau_flag(final, f["measure"])
        mark = notes.setdefault(flag, "¹²³⁴⁵⁶⁷⁸⁹"[len(notes)]) if flag else ""
        for arm, r in f["residuals"].items():
            nc = r["nearest_control"]
            d = nc["difference"]
            names = ", ".join(sorted({ARM_NAMES[c] for c in nc["controls"]}))
            lines.append(f"| {f['title']} | {ARM_NAMES[arm]} | {r['clean_nll']:.3f} | {r['mean']:+.3f} "
                         f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {r['mde80']:.3f} | {short_verdict(r)}{mark} | {names} "
                         f"({nc['clean_nll_gap']:+.3f}) | {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], "
                         f"p = {d['p_value']:.3g} |")
    if notes:
        lines += [""] + [f"{mark} {flag.strip()[1:-1]}: more budget could change this measure." for flag, mark in notes.items()]
    if ladders:      # did the same-history controls bracket the monotone arm's validation loss (stage 3's rule)?
        lines += ["", "Ladder (stage 3; validation loss of each rung, unconstrained from init, and the monotone arm):"]
        for seed, lad in ladders.items():
            rungs = ", ".join(f"{ARM_NAMES[r['arm']]}{' (added)' if r['added'] else ''} {r['val_loss']:.3f}"
                              for r in lad["rungs"])
            lines.append(f"- seed {seed}: {rungs}; unconstrained from init {lad['unconstrained_from_init_val_loss']:.3f}; "
                         f"monotone {lad['monotonic_val_loss']:.3f}: "
                         + ("bracketed" if lad["bracketed"] else "**not bracketed** by its own history"))
    if len(final["seeds"]) < 5:
        lines += ["", f"Only {len(final['seeds'])} seed(s): the seed-level part of these intervals rests on few draws."]
    return lines + [""]


def recipe_table(final: dict) -> list[str]:
    """The recipe search: validation loss after sweep_tokens at each learning rate, per arm and seed."""
    rows = [(seed, arm, t["lr_sweep"]) for seed, s in final["per_seed"].items() for arm, t in s["training"].items()
            if t.get("lr_sweep")]
    if not rows:
        return []
    lines = ["", "## Recipe search (the same rule for every arm: the lowest validation loss after the full run's "
                 "first sweep tokens and a cooldown; a winning edge of the grid is extended half a decade; lr 0 is the "
                 "start model)", "", "| Seed | Arm | Prefix + cooldown tokens | Validation loss per lr (+: added) | "
                 "Chosen lr |", "|---|---|---|---|---|"]
    for seed, arm, sw in rows:
        added = set(sw.get("added", []))
        chosen = f"{sw['chosen_lr']:g}" + (" (the start model)" if sw.get("start_is_best") else "") + \
            (" **on an edge**" if sw.get("chosen_on_edge") else "")
        lines.append(f"| {seed} | {arm} | {sw['sweep_tokens']:,} + {sw.get('cooldown_tokens', 0):,} | " + ", ".join(
            f"{r['lr']:g}{'+' if r['lr'] in added else ''}: {r['val_loss']:.4f}"
            + (f" (full {r['full_val_loss']:.4f})" if "full_val_loss" in r else "") for r in sw["rows"]) + f" | {chosen} |")
    return lines


def markdown(final: dict) -> str:
    seeds = final["seeds"]
    lines = [f"# Results: monotone MLPs vs. adversarial attacks ({final['preset']}, seeds {', '.join(map(str, seeds))})", ""]
    if final["partial"]:
        lines += ["**PARTIAL RESULTS**: missing inputs: " +
                  "; ".join(f"seed {s}: {', '.join(m)}" for s, m in final["missing"].items()), ""]
    lines += markdown_head(final, LEAD_FIGURE)
    lines += _provenance(final)
    lines += matched_control(final)
    lines += paper_protocol_table(final)
    lines += attack_strength(final) + [""]
    lines += ["## Every arm", "", _sizes(final), "",
              "Across seeds: perplexity mean [t-based 95% interval over seeds]; every attack measure the mean of the "
              "seed means [hierarchical bootstrap 95% interval: seeds, then texts within each seed]. Shared models "
              "(*: the same model for every seed) show their perplexity's bootstrap interval over documents. Success: "
              f"relative NLL increase > {100 * final['success_threshold']:.0f}%; delta-NLL in nats/token. Absolute "
              "damage still grows with clean quality (a better model has more to lose): compare arms at equal "
              "clean loss, as the frontier above does, not across this table.", "",
              "GCG: the same threat model and success criterion as HotFlip (at most as many modified tokens).", "",
              "| Model | Label | Perplexity | HotFlip success | HotFlip dNLL | GCG success | GCG dNLL | Random-flip dNLL "
              "| UAT dNLL | UAT rel. |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    acr = final["across_seeds"]["arms"]
    for arm in arms_present(final):
        a = acr[arm]
        name = ARM_NAMES[arm] + (" *" if a.get("shared") else "")
        lines.append(f"| {name} | {_label(final, arm)} | {fmt(a['perplexity'])} | "
                     f"{fmt(a['hotflip_success_rate'], 100, 1, True)} | {fmt(a['hotflip_mean_abs_delta_nll'], 1, 3)} | "
                     f"{fmt(a.get('gcg_success_rate'), 100, 1, True)} | {fmt(a.get('gcg_mean_abs_delta_nll'), 1, 3)} | "
                     f"{fmt(a['random_flip_mean_abs_delta_nll'], 1, 3)} | {fmt(a['uat_abs_delta_nll'], 1, 3)} | "
                     f"{fmt(a['uat_rel_delta_nll'], 100, 1, True)} |")
    tests = final["across_seeds"].get("tests", {})
    if tests:
        lines += ["", "## Every pair of arms (paired on the same texts, every seed)", "",
                  "Mean difference first - second (negative: the first takes less damage). An arm is named only "
                  f"where the test rejects equality at the 0.05 level after Holm's adjustment over the {len(tests)} "
                  "tests of this table; MDE: the difference it detects with 80% power. Test: the hierarchical "
                  "bootstrap (seeds, then texts), inverted; each seed attacks its own draw of texts (the seed orders "
                  "the test split), shared by every arm of that seed.", "",
                  "| Measure | Arms | Difference [95% CI] | Verdict | n seeds (texts) | p | Holm p | MDE (80%) |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, t in tests.items():
            verdict = final["across_seeds"]["more_robust"][key].split(" (")[0]
            lines.append(f"| {t['measure']} | {ARM_NAMES[t['arms'][0]]} vs {ARM_NAMES[t['arms'][1]]} | "
                         f"{t['mean']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] | {verdict}"
                         f"{plateau_flag(final, t['measure'])} | "
                         f"{t['n']} ({t['n_texts']}) | {t['p_value']:.3g} | {t['p_holm']:.3g} | {t['mde80']:.3f} |")
    lines += ["", "## Per seed (95% intervals over examples: Wilson for success, bootstrap otherwise)", "",
              "| Seed | Model | Perplexity | HotFlip success | HotFlip dNLL | GCG success | GCG dNLL | UAT dNLL [per-text CI] |",
              "|---|---|---|---|---|---|---|---|"]
    for seed, s in final["per_seed"].items():
        for arm in arms_present(final):
            r = s["arms"].get(arm)
            if not r:
                continue
            ci = lambda k, sc=1.0, d=2: (f" [{r[k][0] * sc:.{d}f}, {r[k][1] * sc:.{d}f}]" if k in r else "")  # noqa: E731
            lines.append(f"| {seed} | {ARM_NAMES[arm]} | {r.get('perplexity', float('nan')):.2f}{ci('perplexity_ci95')} | "
                         f"{100 * r.get('hotflip_success_rate', float('nan')):.1f}%{ci('hotflip_success_ci95', 100, 1)} | "
                         f"{r.get('hotflip_mean_abs_delta_nll', float('nan')):.3f}{ci('hotflip_delta_ci95', 1, 3)} | "
                         f"{100 * r.get('gcg_success_rate', float('nan')):.1f}%{ci('gcg_success_ci95', 100, 1)} | "
                         f"{r.get('gcg_mean_abs_delta_nll', float('nan')):.3f}{ci('gcg_delta_ci95', 1, 3)} | "
                         f"{r.get('uat_abs_delta_nll', float('nan')):.3f}{ci('uat_delta_ci95', 1, 3)} |")
    lines += ["", "## Paired tests per seed, baseline vs monotone (unit: the text; the UAT test is conditional on "
              "the triggers that seed's searches found)", "", "| Seed | Measure | Test | p-value | Detail |",
              "|---|---|---|---|---|"]
    for seed, s in final["per_seed"].items():
        for name, t in s["tests"].items():
            detail = (f"baseline-only successes {t['only_first']}, monotone-only {t['only_second']}" if "only_first" in t
                      else f"mean difference (baseline - monotone) {t['mean_difference']:+.3f}")
            lines.append(f"| {seed} | {name} | {t['test']} | {t['p_value']:.3g} | {detail} |")
    lines += ["", "## Recovery training", "", "| Seed | Arm | Tokens | lr | Val ppl start -> end | Fraction of V changed |",
              "|---|---|---|---|---|---|"]
    for seed, s in final["per_seed"].items():
        for arm, t in s["training"].items():
            frac = "n/a" if t["fraction_V_changed"] is None else f"{100 * t['fraction_V_changed']:.1f}%"
            lines.append(f"| {seed} | {arm} | {t['tokens']:,} | {'n/a' if t['lr'] is None else format(t['lr'], 'g')} | {t['start_val_perplexity']:.1f} -> "
                         f"{t['final_val_perplexity']:.1f} | {frac} |")
    lines += recipe_table(final)
    lines += attack_cost(final)
    lines += capability_table(final)
    lines += weight_change_table(final)
    lines += ["", f"Plots: {LEAD_FIGURE}, robustness_all_measures.png, attack_convergence.png, success_vs_threshold.png, training_curves.png, perplexity.png, "
              "hotflip_delta_nll.png" + (", gcg_delta_nll.png" if _has(final, "gcg_mean_abs_delta_nll") else "")
              + ", uat_transfer.png", ""]
    return "\n".join(lines)


def _tex_cell(stat: dict, scale=1.0, digits=2, pct=False) -> str:
    if not stat or stat.get("mean") is None:
        return "--"
    unit = r"\%" if pct else ""
    cell = f"{stat['mean'] * scale:.{digits}f}{unit}"
    if stat.get("ci95"):      # the interval as it is: Wilson and bootstrap intervals are not symmetric
        lo, hi = stat["ci95"]
        cell += f" [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"
    return cell


def latex(final: dict, standalone: bool = False) -> str:
    """A booktabs table to \\input into a paper (needs \\usepackage{booktabs}); standalone: a document around it."""
    acr = final["across_seeds"]["arms"]
    rows = []
    for arm in arms_present(final):
        a = acr[arm]
        rows.append(f"{ARM_NAMES[arm]} & {_tex_cell(a['perplexity'])} & {_tex_cell(a['hotflip_success_rate'], 100, 1, True)}"
                    f" & {_tex_cell(a['hotflip_mean_abs_delta_nll'], 1, 3)} & {_tex_cell(a.get('gcg_success_rate'), 100, 1, True)}"
                    f" & {_tex_cell(a.get('gcg_mean_abs_delta_nll'), 1, 3)} & {_tex_cell(a['uat_rel_delta_nll'], 100, 1, True)}"
                    f" & {_tex_cell(a['uat_abs_delta_nll'], 1, 3)} \\\\")
    n = len(final["seeds"])
    note = (f"Mean over {n} seed(s), 95\\% interval in brackets. Attack measures: the mean of the seed means, "
            f"hierarchical bootstrap interval (seeds, then texts within each seed). Perplexity of the arms shared "
            f"by every seed (pretrained, controls, monotone init): bootstrap over documents; of the trained arms: "
            + (f"t interval over the {n} seeds." if n > 1 else "none (one seed has no interval across seeds)."))
    note += " " + _sizes(final).replace("%", "\\%")
    if final["partial"]:
        note += " PARTIAL: some seeds lack some stages."
    table = [r"\begin{tabular}{lccccccc}", r"\toprule",
             r"Model & Perplexity & HotFlip success & HotFlip $\Delta$NLL & GCG success & GCG $\Delta$NLL & "
             r"UAT NLL increase & UAT $\Delta$NLL \\",
             r"\midrule", *rows, r"\bottomrule", r"\end{tabular}", "", rf"\footnotesize {note}", ""]
    table += _latex_capabilities(final)
    if not standalone:
        return "\n".join([f"% {final['preset']}: \\input this file; it needs \\usepackage{{booktabs}}", *table])
    return "\n".join([r"\documentclass[varwidth=\maxdimen]{standalone}", r"\usepackage{booktabs}",
                      r"\begin{document}", *table, r"\end{document}", ""])


def _latex_capabilities(final: dict) -> list[str]:
    """Zero-shot accuracy (%) per task (rows) and arm (columns), when stage 4 evaluated tasks."""
    caps = final["across_seeds"].get("capabilities")
    if not caps:
        return []
    arms = [a for a in ORDER if any(a in row["arms"] for row in caps.values())]
    rows = [task.replace("_", r"\_") + " & " + " & ".join(
        _tex_cell(row["arms"].get(a), 100, 1) for a in arms) + r" \\" for task, row in caps.items()]
    return [r"\begin{tabular}{l" + "c" * len(arms) + "}", r"\toprule",
            "Task & " + " & ".join(ARM_NAMES[a] for a in arms) + r" \\", r"\midrule", *rows, r"\bottomrule",
            r"\end{tabular}", "", r"\footnotesize Zero-shot accuracy (\%), lm-evaluation-harness; in brackets "
            r"the 95\% t interval over seeds.", ""]
