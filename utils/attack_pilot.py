"""The attack pilot: where stage 6's searches plateau, measured before any training (issue 36's first item).

On the arms that exist after stages 0-1 (the pretrained model, monotonic_init and the first control: the range
of clean loss the recovered arms will span), on the first `texts` of the seed's attacked texts:
  GCG        one run per (search width, top-k) of {1, 2} x the preset's width and {1, 4} x its top-k, at 4 x its
             steps; a run's trace holds every shorter run (steps are sequential, drawn from the text's own
             generator), so each gives the damage at 1/4, 1/2, 1, 2 and 4 x the preset's steps
  HotFlip    one run per top-k of 1/2, 1 and 2 x the preset's
  flips      HotFlip at the preset's width with at most 1, 2, 5, 10, 20 flips and unbounded (every position of
             the text): the success-against-flips curve. A search that cannot break a text with unlimited flips is
             too weak to carry a claim: unbounded success should approach 100%.
Budgets: for each search the cheapest setting (exact forward passes per text) whose doubling adds under 5%
(convergence.PLATEAU_GAIN) mean damage on every arm, printed as --set lines. UAT's budget needs no pilot of
this kind: each restart stops on its own after a sweep without gain, and stage 5 reports whether all did.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from configs.experiment_config import ExperimentConfig
from utils.attacks import gcg, hotflip
from utils.attacks.core import Victim, forbidden_tokens
from utils.data.tokenization import load_tokenizer
from utils.measurement import available_arms, load_arm
from utils.results.convergence import PLATEAU_GAIN
from utils.run.compute import Compute
from utils.run.run_files import PipelineError, RunPaths, write_json
from utils.text_attacks import attacked_texts

STEP_FACTORS = (0.25, 0.5, 1, 2, 4)
FLIPS = (1, 2, 5, 10, 20, None)             # None: every position of the text


def pilot_arms(paths: RunPaths) -> dict[str, Path]:
    arms = available_arms(paths)
    if "monotonic_init" not in arms:
        raise PipelineError("the attack pilot runs on stages 0-1's arms: run stage 1 first")
    controls = [a for a in arms if a.startswith("control_")]
    return {a: arms[a] for a in ["pretrained", "monotonic_init", *controls[:1]]}


def _gcg_grid(a) -> list[dict]:
    return [{"gcg_search_width": w * a.gcg_search_width, "gcg_top_k": k * a.gcg_top_k}
            for w in (1, 2) for k in (1, 4)]


def run_pilot(cfg: ExperimentConfig, paths: RunPaths, n_texts: int) -> dict:
    """Every sweep on every pilot arm; returns (and writes to results/attack_pilot.json) the measurements and the
    recommended budgets."""
    a, compute = cfg.attack, Compute.from_config(cfg.device, cfg.precision)
    tokenizer = load_tokenizer(paths.shared / "tokenizer")
    texts = attacked_texts(cfg, paths, n_texts)
    steps = [max(1, round(f * a.gcg_steps)) for f in STEP_FACTORS]
    out = {"texts": len(texts), "threshold": a.success_threshold, "preset_budgets": {
        k: getattr(a, k) for k in ("gcg_steps", "gcg_search_width", "gcg_top_k", "hotflip_top_k", "hotflip_max_flips")},
        "gcg": {}, "hotflip": {}, "flips": {}}
    for arm, path in pilot_arms(paths).items():
        victim = Victim(load_arm(path, compute.device), compute, a.batch_size)
        forbidden = forbidden_tokens(tokenizer, victim.embeddings.shape[0])
        for g in _gcg_grid(a):
            cfg_g = _with(a, gcg_steps=steps[-1], **g)
            traces = [gcg.attack_text(victim, t["ids"], cfg_g, forbidden,
                                      torch.Generator().manual_seed(cfg.seed * 100_003 + t["doc"]))["trace"]
                      for t in texts]
            key = f"width {g['gcg_search_width']}, top-k {g['gcg_top_k']}"
            out["gcg"].setdefault(key, {"setting": g, "steps": steps, "forward_passes": [], "damage": {}})
            # a trace's point i is after step i (point 0: before the first): the run at s steps is its prefix
            out["gcg"][key]["damage"][arm] = [float(np.mean([tr[min(s, len(tr) - 1)][1] for tr in traces])) for s in steps]
            out["gcg"][key]["forward_passes"] = [float(np.mean([tr[min(s, len(tr) - 1)][0] for tr in traces]))
                                                 for s in steps]
        for k in (max(1, a.hotflip_top_k // 2), a.hotflip_top_k, 2 * a.hotflip_top_k):
            recs = [hotflip.attack_text(victim, t["ids"], _with(a, hotflip_top_k=k), forbidden) for t in texts]
            row = out["hotflip"].setdefault(str(k), {"forward_passes": 0.0, "damage": {}})
            row["damage"][arm] = float(np.mean([r["abs_delta_nll"] for r in recs]))
            row["forward_passes"] = float(np.mean([r["cost"]["forward_passes"] for r in recs]))
        curve = {}
        for flips in FLIPS:
            recs = [hotflip.attack_text(victim, t["ids"], _with(a, hotflip_max_flips=flips or len(t["ids"]) - 1), forbidden)
                    for t in texts]
            curve["unbounded" if flips is None else str(flips)] = {
                "success": float(np.mean([r["rel_delta_nll"] > a.success_threshold for r in recs])),
                "mean_flips": float(np.mean([r["n_flips"] for r in recs]))}
        out["flips"][arm] = curve
        del victim
    out["recommended"] = recommend(out)
    paths.results.mkdir(parents=True, exist_ok=True)
    write_json(paths.results / "attack_pilot.json", out)
    return out


def _with(a, **changes):
    return dataclasses.replace(a, **changes)


def _plateaued(low: dict[str, float], high: dict[str, float]) -> bool:
    """Doubling from `low` to `high` adds under PLATEAU_GAIN of the damage on every arm."""
    return all(high[arm] - low[arm] < PLATEAU_GAIN * max(high[arm], 1e-12) for arm in high)


def recommend(out: dict) -> dict:
    """The cheapest budgets whose doubling adds under 5% on every arm (None where no measured one does); for GCG
    also within 5% of the most any measured setting found on every arm (a narrow search can plateau lower)."""
    rec = {}
    most = {arm: max(max(row["damage"][arm]) for row in out["gcg"].values()) for arm in
            next(iter(out["gcg"].values()))["damage"]} if out["gcg"] else {}
    best = None                          # GCG: (forward passes, setting, steps), the cheapest that qualifies
    for row in out["gcg"].values():
        for i in range(len(row["steps"]) - 1):
            lo = {arm: d[i] for arm, d in row["damage"].items()}
            hi = {arm: d[i + 1] for arm, d in row["damage"].items()}
            if _plateaued(lo, hi) and all(lo[arm] >= (1 - PLATEAU_GAIN) * most[arm] for arm in lo):
                cand = (row["forward_passes"][i], row["setting"], row["steps"][i])
                best = min(best, cand, key=lambda c: c[0]) if best else cand
                break
    rec["gcg"] = None if best is None else {**best[1], "gcg_steps": best[2], "forward_passes_per_text": best[0]}
    ks = sorted(out["hotflip"], key=int)
    rec["hotflip"] = next(({"hotflip_top_k": int(lo)} for lo, hi in zip(ks, ks[1:])
                           if _plateaued(out["hotflip"][lo]["damage"], out["hotflip"][hi]["damage"])), None)
    rec["unbounded_success"] = {arm: c["unbounded"]["success"] for arm, c in out["flips"].items()}
    return rec


def set_lines(rec: dict) -> list[str]:
    keys = [(k, v) for part in ("gcg", "hotflip") if rec.get(part) for k, v in rec[part].items()
            if k.startswith(("gcg_", "hotflip_"))]
    return [f"--set attack.{k}={v}" for k, v in keys]


def markdown(out: dict) -> str:
    arms = list(next(iter(out["hotflip"].values()))["damage"])
    lines = [f"Attack pilot: {out['texts']} texts per arm; mean dNLL (nats/token). Preset budgets: "
             + ", ".join(f"{k} {v}" for k, v in out["preset_budgets"].items()), "",
             "| GCG setting | steps | forward passes per text | " + " | ".join(arms) + " |",
             "|---|---|---|" + "---|" * len(arms)]
    for key, row in out["gcg"].items():
        for i, s in enumerate(row["steps"]):
            lines.append(f"| {key} | {s} | {row['forward_passes'][i]:,.0f} | "
                         + " | ".join(f"{row['damage'][arm][i]:.3f}" for arm in arms) + " |")
    lines += ["", "| HotFlip top-k | forward passes per text | " + " | ".join(arms) + " |",
              "|---|---|" + "---|" * len(arms)]
    for k, row in sorted(out["hotflip"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {k} | {row['forward_passes']:,.0f} | " + " | ".join(f"{row['damage'][arm]:.3f}" for arm in arms) + " |")
    flips = list(next(iter(out["flips"].values())))
    lines += ["", f"Success (relative NLL increase > {100 * out['threshold']:g}%) against the flips allowed:", "",
              "| Arm | " + " | ".join(flips) + " |", "|---|" + "---|" * len(flips)]
    for arm, curve in out["flips"].items():
        lines.append(f"| {arm} | " + " | ".join(f"{100 * curve[f]['success']:.0f}%" for f in flips) + " |")
    rec = out["recommended"]
    lines += ["", "Recommended (the cheapest budget whose doubling adds under 5% on every arm): "
              + (" ".join(set_lines(rec)) or "none of the measured budgets plateaued: widen the pilot")]
    weak = [arm for arm, s in rec["unbounded_success"].items() if s < 0.9]
    if weak:
        lines.append(f"Unbounded flips break under 90% of the texts on {', '.join(weak)}: the search is too weak there.")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, row in out["gcg"].items():
        for arm, d in row["damage"].items():
            ax.plot(row["forward_passes"], d, marker="o", label=f"{arm}, {key}")
    ax.set_xscale("log")
    ax.set_xlabel("exact forward passes per text")
    ax.set_ylabel("mean dNLL (nats/token)")
    ax.set_title("GCG: damage against budget")
    ax.legend(fontsize=6)
    for arm, curve in out["flips"].items():
        xs = [float(k) if k != "unbounded" else c["mean_flips"] for k, c in curve.items()]
        bx.plot(xs, [100 * c["success"] for c in curve.values()], marker="o", label=arm)
    bx.set_xscale("log")
    bx.set_xlabel("flips allowed (unbounded: at its mean flips)")
    bx.set_ylabel(f"success, % (> {100 * out['threshold']:g}% NLL)")
    bx.set_title("HotFlip: success against flips")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: dict, results: Path) -> list[str]:
    (results / "attack_pilot.md").write_text(markdown(out))
    plot(out, results / "attack_pilot.png")
    return [str(results / n) for n in ("attack_pilot.json", "attack_pilot.md", "attack_pilot.png")]
