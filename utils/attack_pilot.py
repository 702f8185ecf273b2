"""The attack pilot: where stage 6's searches plateau, measured before any training (issue 36's first item).

On the arms that exist after stages 0-1 (the pretrained model, monotonic_init and the first control: the range
of clean loss the recovered arms will span), on the first `texts` of the seed's attacked texts:
  GCG        one run per (search width, top-k) of {1, 2} x the preset's width and {1, 4} x its top-k, at 4 x its
             steps; a run's trace holds every shorter run (steps are sequential, drawn from the text's own
             generator), so each gives the damage at 1/4, 1/2, 1, 2 and 4 x the preset's steps
  HotFlip    one run per top-k of 1/2, 1, 2 and 4 x the preset's
  flips      HotFlip at the preset's width with at most 1, 2, 5, 10, 20 flips and unbounded (every position of
             the text): the success-against-flips curve. A search that cannot break a text with unlimited flips is
             too weak to carry a claim: unbounded success should approach 100%.
  UAT        stage 5's trigger search on its optimisation texts with 4 x the preset's sweep cap: a restart's trace
             holds its state after every sweep, so one search gives the damage (the best restart's, as stage 5
             keeps it) at caps of 1/4 to 4 x the preset's, and the sweeps each restart used before it stopped on
             its own (a sweep without gain). UAT searched with GCG (uat_search gcg) shares GCG's budget: not swept.
Budgets: for each search the cheapest setting (exact forward passes per text) whose doubling adds under 5%
(convergence.PLATEAU_GAIN) mean damage on every arm, printed as --set lines.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from configs.experiment_config import AttackConfig, ExperimentConfig
from utils.attacks import gcg, hotflip, uat
from utils.attacks.core import Victim, forbidden_tokens, select_texts
from utils.data.tokenization import TokenFile, load_tokenizer
from utils.measurement import available_arms, load_arm
from utils.results.convergence import PLATEAU_GAIN
from utils.run import distributed
from utils.run.compute import Compute
from utils.run.pilot_grid import FLIPS, pilot_runs
from utils.run.run_files import PipelineError, RunPaths, write_json
from utils.text_attacks import attacked_texts


def pilot_arms(paths: RunPaths) -> dict[str, Path]:
    """pretrained, monotonic_init and the first control stage 0 measured (utils/run/time_limits.pilot_arms counts
    as many)."""
    arms = available_arms(paths)
    if "monotonic_init" not in arms:
        raise PipelineError("the attack pilot runs on stages 0-1's arms: run stage 1 first")
    controls = [a for a in arms if a.startswith("control_")]
    return {a: arms[a] for a in ["pretrained", "monotonic_init", *controls[:1]]}


def run_pilot(cfg: ExperimentConfig, paths: RunPaths, n_texts: int) -> dict:
    """Every sweep on every pilot arm; returns (and, on rank 0, writes to results/attack_pilot.json) the
    measurements and the recommended budgets. Under torchrun each rank attacks a contiguous share of the texts
    (every search is per text) and UAT's candidate batches are shared out (utils/attacks/core.Victim)."""
    arms = pilot_arms(paths)            # first: stages 0-1 missing is the thing to say
    a, compute = cfg.attack, Compute.from_config(cfg.device, cfg.precision)
    tokenizer = load_tokenizer(paths.shared / "tokenizer")
    texts = attacked_texts(cfg, paths, n_texts)
    mine = [texts[i] for i in distributed.my_share(len(texts))]
    runs = pilot_runs(a)
    out = {"texts": len(texts), "threshold": a.success_threshold, "processes": distributed.world_size(),
           "preset_budgets": {k: getattr(a, k) for k in ("gcg_steps", "gcg_search_width", "gcg_top_k",
                                                          "hotflip_top_k", "hotflip_max_flips", "uat_max_sweeps")},
           "gcg": {}, "hotflip": {}, "flips": {}, "uat": {}}
    uat_opt = [t["ids"] for t in select_texts(TokenFile(paths.shared / "tokens", "test"), tokenizer.eos_token_id,
                                               a.uat_opt_texts, a.text_len, a.min_text_len, cfg.seed)]
    init_token = tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    steps = runs["gcg_steps"]
    for arm, path in arms.items():
        model = load_arm(path, compute.device)
        victim = Victim(model, compute, a.batch_size)
        forbidden = forbidden_tokens(tokenizer, victim.embeddings.shape[0])
        for g in runs["gcg"]:
            traces = distributed.gather_shares([
                gcg.attack_text(victim, t["ids"], g, forbidden,
                                torch.Generator().manual_seed(cfg.seed * 100_003 + t["doc"]))["trace"] for t in mine])
            key = f"width {g.gcg_search_width}, top-k {g.gcg_top_k}"
            row = out["gcg"].setdefault(key, {"setting": {"gcg_search_width": g.gcg_search_width,
                                                          "gcg_top_k": g.gcg_top_k}, "steps": steps, "damage": {}})
            # a trace's point i is after step i (point 0: before the first): the run at s steps is its prefix
            row["damage"][arm] = [float(np.mean([tr[min(s, len(tr) - 1)][1] for tr in traces])) for s in steps]
            row["forward_passes"] = [float(np.mean([tr[min(s, len(tr) - 1)][0] for tr in traces])) for s in steps]
        for h in runs["hotflip"]:
            recs = distributed.gather_shares([_hotflip(victim, t, h, forbidden) for t in mine])
            row = out["hotflip"].setdefault(str(h.hotflip_top_k), {"damage": {}})
            row["damage"][arm] = float(np.mean([r["abs_delta_nll"] for r in recs]))
            row["forward_passes"] = float(np.mean([r["forward_passes"] for r in recs]))
        curve = {}
        for flips, h in zip(FLIPS, runs["flips"]):
            recs = distributed.gather_shares([_hotflip(victim, t, h, forbidden) for t in mine])
            curve["unbounded" if flips is None else str(flips)] = {
                "success": float(np.mean([r["rel_delta_nll"] > a.success_threshold for r in recs])),
                "mean_flips": float(np.mean([r["n_flips"] for r in recs]))}
        out["flips"][arm] = curve
        if runs["uat"] is not None:
            shared = Victim(model, compute, a.batch_size, shard=True)
            out["uat"][arm] = _uat_caps(shared, uat_opt, runs["uat"], forbidden, cfg.seed, init_token, runs["uat_sweeps"])
        del victim, model
    out["recommended"] = recommend(out)
    if distributed.is_main():
        paths.results.mkdir(parents=True, exist_ok=True)
        write_json(paths.results / "attack_pilot.json", out)
    return out


def _hotflip(victim: Victim, text: dict, a: AttackConfig, forbidden) -> dict:
    """HotFlip on one text, at most every position of it flipped where a's limit is longer."""
    a = dataclasses.replace(a, hotflip_max_flips=min(a.hotflip_max_flips, len(text["ids"]) - 1))
    rec = hotflip.attack_text(victim, text["ids"], a, forbidden)
    return {"abs_delta_nll": rec["abs_delta_nll"], "rel_delta_nll": rec["rel_delta_nll"], "n_flips": rec["n_flips"],
            "forward_passes": rec["cost"]["forward_passes"]}


def _uat_caps(victim: Victim, texts, a, forbidden, seed: int, init_token: int, sweeps: list[int]) -> dict:
    """One trigger search at the largest cap; a restart's trace point s is its state after sweep s (point 0: the
    start), so the run at cap s is the prefix. Damage: the best restart's optimisation-set damage (stage 5 keeps
    the best); forward passes: all restarts'."""
    found = uat.find_trigger(victim, texts, a, forbidden, seed, init_token)
    traces = [r["trace"] for r in found["restarts"]]
    return {"sweeps": sweeps, "damage": [max(tr[min(s, len(tr) - 1)][1] for tr in traces) for s in sweeps],
            "forward_passes": [float(sum(tr[min(s, len(tr) - 1)][0] for tr in traces)) for s in sweeps],
            "sweeps_used": [r["iterations"] for r in found["restarts"]]}


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
    rec["uat"] = None
    if out["uat"]:
        caps = next(iter(out["uat"].values()))["sweeps"]
        for i in range(len(caps) - 1):
            if _plateaued({arm: u["damage"][i] for arm, u in out["uat"].items()},
                          {arm: u["damage"][i + 1] for arm, u in out["uat"].items()}):
                rec["uat"] = {"uat_max_sweeps": caps[i]}
                break
    rec["unbounded_success"] = {arm: c["unbounded"]["success"] for arm, c in out["flips"].items()}
    return rec


def set_lines(rec: dict) -> list[str]:
    keys = [(k, v) for part in ("gcg", "hotflip", "uat") if rec.get(part) for k, v in rec[part].items()
            if k.startswith(("gcg_", "hotflip_", "uat_"))]
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
    if out["uat"]:
        lines += ["", "| UAT sweep cap | forward passes (all restarts) | " + " | ".join(out["uat"]) + " |",
                  "|---|---|" + "---|" * len(out["uat"])]
        first = next(iter(out["uat"].values()))
        for i, cap in enumerate(first["sweeps"]):
            lines.append(f"| {cap} | {first['forward_passes'][i]:,.0f} | "
                         + " | ".join(f"{u['damage'][i]:.3f}" for u in out["uat"].values()) + " |")
        lines.append("Sweeps each restart used before a sweep without gain stopped it: "
                     + "; ".join(f"{arm} {u['sweeps_used']}" for arm, u in out["uat"].items()) + ".")
    rec = out["recommended"]
    lines += ["", "Recommended (the cheapest budget whose doubling adds under 5% on every arm): "
              + (" ".join(set_lines(rec)) or "none")]
    unsettled = [name for name, part in (("GCG", "gcg"), ("HotFlip's top-k", "hotflip"), ("UAT's sweep cap", "uat"))
                 if out[part] and rec.get(part) is None]
    if unsettled:
        lines.append(f"Not plateaued within the measured budgets: {', '.join(unsettled)} (raise the preset's and rerun).")
    weak = [arm for arm, s in rec["unbounded_success"].items() if s < 0.9]
    if weak:
        lines.append(f"Unbounded flips break under 90% of the texts on {', '.join(weak)}: the search is too weak there.")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(16, 4.2))
    for key, row in out["gcg"].items():
        for arm, d in row["damage"].items():
            ax.plot(row["forward_passes"], d, marker="o", label=f"{arm}, {key}")
    hot = sorted(out["hotflip"].values(), key=lambda row: row["forward_passes"])
    for arm in (next(iter(out["hotflip"].values()))["damage"] if hot else []):
        ax.plot([row["forward_passes"] for row in hot], [row["damage"][arm] for row in hot], "s--",
                label=f"{arm}, HotFlip top-k {', '.join(out['hotflip'])}")
    ax.set_xscale("log")
    ax.set_xlabel("exact forward passes per text")
    ax.set_ylabel("mean dNLL (nats/token)")
    ax.set_title("GCG (and HotFlip, dashed): damage against budget")
    ax.legend(fontsize=6)
    for arm, curve in out["flips"].items():
        xs = [float(k) if k != "unbounded" else c["mean_flips"] for k, c in curve.items()]
        bx.plot(xs, [100 * c["success"] for c in curve.values()], marker="o", label=arm)
    bx.set_xscale("log")
    bx.set_xlabel("flips allowed (unbounded: at its mean flips)")
    bx.set_ylabel(f"success, % (> {100 * out['threshold']:g}% NLL)")
    bx.set_title("HotFlip: success against flips")
    bx.legend(fontsize=7)
    for arm, u in out["uat"].items():
        cx.plot(u["sweeps"], u["damage"], marker="o", label=arm)
    cx.set_xscale("log")
    cx.set_xlabel("sweep cap")
    cx.set_ylabel("best restart's dNLL, optimisation texts")
    cx.set_title("UAT: damage against sweeps")
    cx.legend(fontsize=7)
    for axis in (ax, bx, cx):          # log axes: label the decades and the measured points, not every minor tick
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    cx.set_xticks(next(iter(out["uat"].values()))["sweeps"] if out["uat"] else [])
    cx.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: dict, results: Path) -> list[str]:
    (results / "attack_pilot.md").write_text(markdown(out))
    plot(out, results / "attack_pilot.png")
    return [str(results / n) for n in ("attack_pilot.json", "attack_pilot.md", "attack_pilot.png")]
