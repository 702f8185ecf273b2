"""Stage 7's PNG plots: robustness against clean loss (the frontier), success against the threshold,
training curves, perplexity per model, attack damage per text, UAT transfer.

Each figure function returns the matplotlib figure (tests read its data); `plots` saves them.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from utils.results.formatting import ARM_NAMES, arms_present  # noqa: E402
from utils.results.frontier import is_unconstrained  # noqa: E402


def training_figure(final: dict):
    """Train (dotted) and validation (solid) loss, one colour per arm, every seed."""
    seeds, tag = final["per_seed"], " (PARTIAL)" if final["partial"] else ""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"baseline": "tab:blue", "monotonic": "tab:red", "unconstrained_from_init": "tab:green"}
    for seed, s in seeds.items():
        for arm, colour in colours.items():
            if arm in s["training"]:
                first = seed == next(iter(seeds))
                if s["training"][arm].get("train_curve"):
                    ax.plot(*zip(*s["training"][arm]["train_curve"]), ":", color=colour, alpha=0.6,
                            label=f"{arm}, train" if first else None)
                ax.plot(*zip(*s["training"][arm]["curve"]), "-", color=colour, marker=".",
                        label=f"{arm}, validation" if first else None)
    ax.set(xlabel="training tokens", ylabel="loss (nats/token)",
           title=f"Recovery training, seeds {', '.join(map(str, seeds))}" + tag)
    ax.legend(fontsize=8)
    return fig


def _interval_kind(stat: dict) -> str:
    if not stat.get("ci95"):
        return "no interval (one seed)"
    return stat.get("interval") or f"t interval over {stat['n']} seeds"


def _deduplicated_legend(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), **kw)


def perplexity_figure(final: dict):
    """Mean and 95% interval per model, each interval's kind in the legend (points, no bars).
    Left: every model, on a log scale (the monotone init is far worse). Right: the others on a
    linear scale, where the differences that matter (pretrained vs recovered arms) show."""
    seeds, tag = final["per_seed"], " (PARTIAL)" if final["partial"] else ""
    arms, acr = arms_present(final), final["across_seeds"]["arms"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers, kinds = "osD^v", []
    for ax, shown, scale in ((axes[0], arms, "log"), (axes[1], [a for a in arms if a != "monotonic_init"], "linear")):
        for i, arm in enumerate(shown):
            vals = [s["arms"][arm]["perplexity"] for s in seeds.values() if "perplexity" in s["arms"].get(arm, {})]
            ax.scatter([i + 0.12] * len(vals), vals, color="grey", zorder=3, s=12, label="one seed")
            stat = acr[arm]["perplexity"]
            if stat["mean"] is not None:
                kind = _interval_kind(stat)
                kinds += [kind] if kind not in kinds else []
                lo, hi = stat["ci95"] or (stat["mean"], stat["mean"])
                ax.errorbar(i, stat["mean"], yerr=[[stat["mean"] - lo], [hi - stat["mean"]]],
                            fmt=markers[kinds.index(kind) % len(markers)], color="k", capsize=4,
                            label=f"mean; 95% interval: {kind}")
        ax.set_xticks(range(len(shown)), [ARM_NAMES[a] for a in shown], rotation=15, ha="right")
        ax.set(yscale=scale, ylabel=f"test perplexity ({scale} scale)")
        _deduplicated_legend(ax, fontsize=7)
    axes[0].set_title("every model")
    axes[1].set_title("without the monotone init")
    fig.suptitle(f"Perplexity per model; seeds {', '.join(map(str, seeds))}" + tag)
    return fig


def damage_figure(final: dict, name: str, title: str):
    """Per-text delta NLL per model as box plots (median line, mean marker, n per model); None without records."""
    seeds, tag = final["per_seed"], " (PARTIAL)" if final["partial"] else ""
    arms = arms_present(final)
    data = [[d for s in seeds.values() for d in s["arms"].get(arm, {}).get(f"{name}_abs_deltas", [])] for arm in arms]
    if not any(data):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    boxes = ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(arms) + 1), [f"{ARM_NAMES[a]}\nn = {len(d)}" for a, d in zip(arms, data)],
                  rotation=15, ha="right")
    ax.legend([boxes["medians"][0], boxes["means"][0]], ["median", "mean"], fontsize=8)
    ax.set(ylabel=f"{title} delta NLL (nats/token)",
           title=f"{title} damage per text (boxes: quartiles; whiskers: 1.5 IQR), seeds "
                 f"{', '.join(map(str, seeds))}" + tag)
    return fig


def uat_figure(final: dict):
    """The UAT transfer matrix, mean over seeds; None without one. The colour scale spans the cells
    without the monotone init (whose damage is far larger): its cells saturate, their numbers stay."""
    seeds, tag = final["per_seed"], " (PARTIAL)" if final["partial"] else ""
    mats = [s["transfer"]["uat_rel_delta_nll"] for s in seeds.values() if "uat_rel_delta_nll" in s["transfer"]]
    if not mats:
        return None
    names = [a for a in arms_present(final) if a in mats[0]]
    grid = [[100 * sum(m[src][dst] for m in mats) / len(mats) for dst in names] for src in names]
    others = [grid[i][j] for i, src in enumerate(names) for j, dst in enumerate(names)
              if "monotonic_init" not in (src, dst)]
    low, top = min(others or sum(grid, [])), max(others or sum(grid, []))
    top = top if top > low else low + 1.0
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(grid, cmap="Reds", vmin=min(0.0, low), vmax=top)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{grid[i][j]:+.1f}%", ha="center", va="center", fontsize=9,
                    color="white" if grid[i][j] > 0.6 * top else "black")
    ax.set_xticks(range(len(names)), [ARM_NAMES[a] for a in names], rotation=20, ha="right")
    ax.set_yticks(range(len(names)), [ARM_NAMES[a] for a in names])
    ax.set(xlabel="evaluated on", ylabel="trigger found on",
           title=f"UAT relative NLL increase, mean of {len(mats)} seed(s)" + tag)
    fig.colorbar(im, ax=ax, label="% NLL increase" + (" (monotone-init cells may exceed the scale)"
                                                     if "monotonic_init" in names else ""))
    return fig


def _arm_style(arm: str) -> dict:
    """One look per arm in every frontier figure: the controls share grey, constrained arms are triangles."""
    if arm.startswith("control_"):
        return {"color": "grey", "marker": "o", "label": "stage 0's controls"}
    if arm.startswith("ladder_"):
        return {"color": "tab:olive", "marker": "s", "label": "ladder (same start, shorter budgets)"}
    colours = {"pretrained": "black", "baseline": "tab:blue", "unconstrained_from_init": "tab:green",
               "monotonic": "tab:red", "monotonic_init": "tab:orange"}
    return {"color": colours.get(arm, "tab:purple"), "marker": "o" if is_unconstrained(arm) else "^",
            "label": ARM_NAMES[arm]}


def _frontier_panel(ax, f: dict) -> None:
    """The frontier, every arm's point per seed, and each constrained arm's residual as a vertical bar from
    the frontier to the arm's mean, with its 95% interval."""
    ax.plot(f["curve"]["clean_nll"], f["curve"]["damage"], "-", color="grey", lw=2, alpha=0.6,
            label="unconstrained frontier (isotonic fit)")
    for arm, pts in f["points"].items():
        st = _arm_style(arm)
        extra = is_unconstrained(arm) and arm not in f["unconstrained_arms"]     # measured, not in the fit: hollow
        ax.scatter(*zip(*pts), marker=st["marker"], s=45 if st["marker"] == "^" else 25, zorder=3,
                   facecolors="none" if extra else st["color"], edgecolors=st["color"],
                   label=st["label"] + (" (not in the fit)" if extra else ""))
    for arm, r in f["residuals"].items():
        if not r["inside_range"]:
            continue
        base = float(np.interp(r["clean_nll"], f["curve"]["clean_nll"], f["curve"]["damage"]))
        ax.errorbar([r["clean_nll"]], [base + r["mean"]], yerr=[[r["mean"] - r["ci95"][0]], [r["ci95"][1] - r["mean"]]],
                    color=_arm_style(arm)["color"], capsize=4, lw=1.5, zorder=4,
                    label=f"{ARM_NAMES[arm]}: residual, 95% interval")
        ax.plot([r["clean_nll"]] * 2, [base, base + r["mean"]], ":", color=_arm_style(arm)["color"], zorder=4)
    ax.set_xlabel("clean NLL on the attacked texts (nats/token)")


ZOOM_NATS = 0.2                         # the lead figure's inset: clean NLL within this of the primary arm's


def lead_figure(final: dict):
    """The figure that carries the answer: the primary measure's frontier and the monotone arm's residual."""
    from utils.results.summary import estimate, primary, primary_names, short_verdict
    f = final["across_seeds"].get("frontier", {}).get(primary_names(final)[0])
    if not f:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    _frontier_panel(ax, f)
    p = primary(final)
    if p and p["inside_range"]:         # a zoom on the primary arm's neighbourhood, where the answer is
        lo, hi = p["clean_nll"] - ZOOM_NATS, p["clean_nll"] + ZOOM_NATS
        near = [y for pts in f["points"].values() for x, y in pts if lo <= x <= hi]
        base = float(np.interp(p["clean_nll"], f["curve"]["clean_nll"], f["curve"]["damage"]))
        ys = near + [base + p["ci95"][0], base + p["ci95"][1]]
        pad = 0.15 * (max(ys) - min(ys)) + 1e-3
        inset = ax.inset_axes([0.5, 0.42, 0.47, 0.5])
        _frontier_panel(inset, f)
        inset.set(xlim=(lo, hi), ylim=(min(ys) - pad, max(ys) + pad), xlabel="")
        inset.tick_params(labelsize=7)
        inset.set_title(f"zoom: clean NLL {lo:.2f}-{hi:.2f}", fontsize=8)
        ax.indicate_inset_zoom(inset, edgecolor="grey")
    verdict = f"{ARM_NAMES[p['arm']]} - frontier: {estimate(p)}: {short_verdict(p)}" if p else \
        "the primary arm was not attacked"
    head = f"{f['title']} against clean loss ({len(final['seeds'])} seed(s))" + (" PARTIAL" if final["partial"] else "")
    ax.set(ylabel=f["title"], title="\n".join(textwrap.wrap(head, 78) + textwrap.wrap(verdict, 78)))
    _deduplicated_legend(ax, fontsize=8, loc="upper left")
    return fig


def measures_figure(final: dict):
    """Every other measure's frontier panel, titles wrapped, one legend for the figure."""
    primary = final["across_seeds"]["primary"]["measure"]
    fr = {m: f for m, f in final["across_seeds"].get("frontier", {}).items() if m != primary}
    if not fr:
        return None
    cols = min(3, len(fr))
    rows = -(-len(fr) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows + 1), squeeze=False, layout="constrained")
    for ax, f in zip(axes.flat, fr.values()):
        _frontier_panel(ax, f)
        lines = [f"{ARM_NAMES[a]} {r['mean']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
                 for a, r in f["residuals"].items() if r["inside_range"]]
        ax.set_title("\n".join(textwrap.wrap(f["title"], 40) + lines), fontsize=9)
        ax.set_xlabel("clean NLL (nats/token)", fontsize=8)
    for ax in list(axes.flat)[len(fr):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Damage against clean loss per measure (residual from the frontier [95% hierarchical bootstrap])"
                 + (" PARTIAL" if final["partial"] else ""), fontsize=10)
    return fig


def success_threshold_figure(final: dict):
    """Per attack, each arm's fraction of texts with dNLL above an absolute threshold, at every threshold."""
    curves = final["across_seeds"].get("success_curves", {})
    if not curves.get("attacks"):
        return None
    fig, axes = plt.subplots(1, len(curves["attacks"]), figsize=(5 * len(curves["attacks"]), 4), squeeze=False)
    for ax, (attack, arms) in zip(axes.flat, curves["attacks"].items()):
        for arm in [a for a in arms_present(final) if a in arms]:
            ax.plot(curves["thresholds"], arms[arm], ":" if arm.startswith("control_") else "-", label=ARM_NAMES[arm])
        ax.axvline(final["across_seeds"]["success_abs_nats"], color="k", lw=0.5)
        ax.set(xlabel="threshold on dNLL (nats/token)", ylabel="success rate (mean of seeds)", title=attack)
        ax.legend(fontsize=6)
    fig.suptitle("Success against the absolute threshold (vertical line: attack.success_abs_nats)")
    return fig


def convergence_figure(final: dict):
    """Mean best-so-far damage against forward passes, per search and arm, with 95% intervals."""
    conv = final["across_seeds"].get("convergence", {})
    if not conv:
        return None
    fig, axes = plt.subplots(1, len(conv), figsize=(4.2 * len(conv), 3.6), squeeze=False)
    for ax, (attack, c) in zip(axes[0], conv.items()):
        for arm, r in c["arms"].items():
            lo, hi = zip(*r["ci95"])
            line, = ax.plot(r["grid"], r["mean"], label=arm + (" (no plateau)" if r["plateaued"] is False else ""))
            ax.fill_between(r["grid"], lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_title(attack)
        ax.set_xlabel("forward passes" + (" per restart" if attack == "uat" else " per text"))
        ax.set_ylabel("best dNLL so far (nats/token)")
        ax.legend(fontsize=6)
    return fig


def plots(final: dict, out_dir: Path) -> list[Path]:
    written = [_save(training_figure(final), out_dir / "training_curves.png"),
               _save(perplexity_figure(final), out_dir / "perplexity.png")]
    for name, title in (("hotflip", "HotFlip"), ("gcg", "GCG")):
        fig = damage_figure(final, name, title)
        if fig is not None:
            written.append(_save(fig, out_dir / f"{name}_delta_nll.png"))
    for fig, name in ((uat_figure(final), "uat_transfer.png"), (lead_figure(final), "robustness_vs_clean_loss.png"),
                      (measures_figure(final), "robustness_all_measures.png"),
                      (convergence_figure(final), "attack_convergence.png"),
                      (success_threshold_figure(final), "success_vs_threshold.png")):
        if fig is not None:
            written.append(_save(fig, out_dir / name))
    return written


def _save(fig, path: Path) -> Path:
    if not fig.get_layout_engine():
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
