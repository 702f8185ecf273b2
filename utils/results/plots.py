"""Stage 7's PNG plots: robustness against clean loss (the frontier), success against the threshold,
training curves, perplexity per model, attack damage per text, UAT transfer.

Each figure function returns the matplotlib figure (tests read its data); `plots` saves them.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from utils.results.formatting import ARM_NAMES, arms_present  # noqa: E402


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


def frontier_figure(final: dict):
    """One panel per measure: every arm's point per seed (clean NLL on the attacked texts, damage), the
    isotonic frontier of the unconstrained arms, and each constrained arm's residual with its interval."""
    fr = final["across_seeds"].get("frontier", {})
    if not fr:
        return None
    cols = min(3, len(fr))
    rows = -(-len(fr) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, f in zip(axes.flat, fr.values()):
        ax.plot(f["curve"]["clean_nll"], f["curve"]["damage"], "-", color="grey", label="frontier (unconstrained)")
        for arm, pts in f["points"].items():
            constrained = arm in f["residuals"]
            ax.scatter(*zip(*pts), marker="^" if constrained else "o", s=30 if constrained else 18,
                       label=ARM_NAMES[arm] if constrained or not arm.startswith("control_") else "controls",
                       color=None if constrained or not arm.startswith("control_") else "grey")
        for arm, r in f["residuals"].items():
            ax.annotate(f"{ARM_NAMES[arm]}: {r['mean']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]",
                        (r["clean_nll"], r["mean"] + float(np.interp(r["clean_nll"], f["curve"]["clean_nll"], f["curve"]["damage"]))),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel="clean NLL on the attacked texts (nats/token)", ylabel=f["title"], title=f["title"])
        _deduplicated_legend(ax, fontsize=6)
    for ax in list(axes.flat)[len(fr):]:
        ax.set_visible(False)
    fig.suptitle(f"Damage against clean loss; residuals from the frontier [95% hierarchical bootstrap], seeds "
                 f"{', '.join(map(str, final['per_seed']))}" + (" (PARTIAL)" if final["partial"] else ""))
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
    for fig, name in ((uat_figure(final), "uat_transfer.png"), (frontier_figure(final), "robustness_vs_clean_loss.png"),
                      (convergence_figure(final), "attack_convergence.png"),
                      (success_threshold_figure(final), "success_vs_threshold.png")):
        if fig is not None:
            written.append(_save(fig, out_dir / name))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
