"""Stage 6: the searches of HotFlip's threat model on every arm, then the worst case per text over
them with the gradient-masking checks (worst_case.json), and PGD on the input embeddings (pgd.json).

Searches: hotflip (utils/attacks/hotflip.py), gcg and random_search (utils/attacks/gcg.py, the same
loop with gradient or uniform proposals), gcg_surrogate (GCG through exact GELU's backward below the
monotone clamp, utils/attacks/masking.py). Under torchrun each rank attacks a contiguous share of the
texts and rank 0 writes what one process would (utils/measurement.py says how stages 4-6 shard).
"""
from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import torch

from configs.experiment_config import TEXT_ATTACKS, WORST_CASE_SEARCHES, ExperimentConfig, listed, numbers
from utils.attacks import gcg, hotflip, pgd
from utils.attacks.core import Victim, forbidden_tokens, select_texts
from utils.attacks.masking import flat_fractions, has_flat_region
from utils.data.tokenization import TokenFile, load_tokenizer
from utils.measurement import (ATTACK_SECTIONS, MeasuredOnce, arm_label, available_arms, load_arm, say,
                               stop_after)
from utils.run import distributed
from utils.run.compute import Compute
from utils.run.run_files import RunPaths, publish, write_json
from utils.run.signals import StopOnSignal


def _summary(records: list[dict], threshold: float) -> dict:
    n = len(records)
    deltas = sorted(r["abs_delta_nll"] for r in records)
    out = {"n": n, "success_rate": sum(r["rel_delta_nll"] > threshold for r in records) / n,
           "mean_abs_delta_nll": sum(deltas) / n, "median_abs_delta_nll": deltas[n // 2],
           "mean_rel_delta_nll": sum(r["rel_delta_nll"] for r in records) / n,
           "mean_clean_nll": sum(r["clean_nll"] for r in records) / n}
    if all("cost" in r for r in records):
        out["cost"] = {k: sum(r["cost"][k] for r in records) for k in records[0]["cost"]}
    return out


def _attack(name: str, victim: Victim, text: dict, a, forbidden, seed: int) -> dict:
    if name == "hotflip":
        return hotflip.attack_text(victim, text["ids"], a, forbidden)
    gen = torch.Generator().manual_seed(seed * 100_003 + text["doc"])
    return gcg.attack_text(victim, text["ids"], a, forbidden, gen, "random" if name == "random_search" else "gradient")


def _surrogate(name: str, a) -> str:
    return "exact_gelu" if name == "gcg_surrogate" else a.surrogate_gradient


def _composition(name: str, a) -> dict:
    if name == "hotflip":
        return hotflip.COMPOSITION
    return gcg.composition(a, "random" if name == "random_search" else "gradient", _surrogate(name, a))


def run_text_attacks(cfg: ExperimentConfig, paths: RunPaths) -> list[str]:
    """Stage 6: each search of attack.text_attacks on every model, under HotFlip's threat model (gcg
    before gcg_surrogate, which reuses GCG's records on arms without the clamp); then the worst case per
    text over them and the gradient-masking checks (worst_case.json), and PGD on the embeddings.

    Each arm is loaded twice per rank: once to run every search on it (and PGD), once, when every arm's
    searches are done, as the target of the others' adversarial texts (the transfer matrices) and for the
    worst case's flat-region check. Transfer needs every arm's texts before any is scored, so once would mean
    holding every arm at the same time."""
    a, compute = cfg.attack, Compute.from_config(cfg.device, cfg.precision)
    chosen = [name for name in TEXT_ATTACKS if name in listed(a.text_attacks)]
    arms = available_arms(paths)
    texts = {name: attacked_texts(cfg, paths, a.hotflip_texts if name == "hotflip" else a.gcg_texts)
             for name in chosen}
    once = {name: MeasuredOnce(cfg, paths, f"stage_6_{name}", ATTACK_SECTIONS) for name in chosen}
    stop = StopOnSignal((signal.SIGUSR1,))          # SLURM's warning: stop after the text, requeue, go on
    done, pgd_models = {name: {} for name in chosen}, {}
    for arm, path in arms.items():
        loaded = {}

        def model():
            if "model" not in loaded:
                loaded["model"] = load_arm(path, compute.device)
            return loaded["model"]
        for name in chosen:
            done[name][arm] = _search_arm(cfg, paths, name, arm, path, model, texts[name], once[name], done, stop)
        if numbers(a.pgd_radii):
            pgd_models[arm] = _pgd_arm(cfg, paths, arm, path, model())
        loaded.clear()
    transfer = {name: {src: {} for src in arms} for name in chosen}
    worst = {}
    for arm, path in arms.items():
        model = load_arm(path, compute.device)
        victim = Victim(model, compute, a.batch_size)
        for name in chosen:
            share = distributed.my_share(len(texts[name]))
            rows = hotflip.rescore(victim, [r for src in arms for r in done[name][src]["examples"][share.start:share.stop]])
            for i, src in enumerate(arms):
                part = distributed.gather_shares(rows[i * len(share):(i + 1) * len(share)])
                # per text, in the order of src's records: the paired transfer - white-box check (stage 7)
                transfer[name][src][arm] = {**_summary(part, a.success_threshold),
                                            "abs_delta_nll_per_text": [r["abs_delta_nll"] for r in part]}
        worst[arm] = _worst_arm(cfg, paths, arm, path, model, done)
        del victim, model
    written = [_write_search(cfg, paths, name, done[name], transfer[name]) for name in chosen]
    written.append(_write_worst_case(cfg, paths, worst, done))
    if numbers(a.pgd_radii):
        written.append(_write_pgd(cfg, paths, pgd_models))
    return written


def attacked_texts(cfg: ExperimentConfig, paths: RunPaths, n: int) -> list[dict]:
    """The first n of the seed's attacked texts (HotFlip's; GCG, random search and PGD take a prefix)."""
    tokenizer = load_tokenizer(paths.shared / "tokenizer")
    a = cfg.attack
    return select_texts(TokenFile(paths.shared / "tokens", "test"), tokenizer.eos_token_id, n, a.text_len,
                        a.min_text_len, cfg.seed)


def _search_arm(cfg: ExperimentConfig, paths: RunPaths, name: str, arm: str, path: Path, model, texts: list[dict],
                once: MeasuredOnce, done: dict, stop: StopOnSignal) -> dict:
    """One search on one arm (`model()` loads it on first use): its records, kept text by text."""
    a, compute = cfg.attack, Compute.from_config(cfg.device, cfg.precision)
    kept_arm = once.get(arm, path)
    if kept_arm:
        say(f"[{name}] {arm:<15} success {100 * kept_arm['summary']['success_rate']:5.1f}% (measured before: kept)")
        return kept_arm
    victim = Victim(model(), compute, a.batch_size, surrogate_gradient=_surrogate(name, a))
    if name == "gcg_surrogate" and not has_flat_region(victim.model) and arm in done.get("gcg", {}):
        # No clamp: exact GELU's gradient is the model's own, the search GCG's, draw for draw.
        entry = {**done["gcg"][arm], "same_as": "gcg (no clamped activation: the surrogate gradient "
                                                "is the model's own, so the search is GCG's)"}
        say(f"[{name}] {arm:<15} no clamped activation: GCG's records")
        once.put(arm, path, entry)
        return entry
    tokenizer = load_tokenizer(paths.shared / "tokenizer")
    forbidden = forbidden_tokens(tokenizer, victim.embeddings.shape[0])
    mine = [texts[i] for i in distributed.my_share(len(texts))]
    records, t0, kept = [], time.time(), 0
    # Text by text, each kept as it is done (every search is seeded by its text alone): SLURM's warning stops
    # the stage after the text in progress and the requeued job goes on with the next. The ranks check
    # together, once per text of the largest share.
    for i in range(-(-len(texts) // distributed.world_size())):
        if i < len(mine):
            t = mine[i]
            rec = once.get_part(arm, path, f"doc{t['doc']}")
            kept += rec is not None
            if rec is None:
                rec = {"doc": t["doc"], **_attack(name, victim, t, a, forbidden, cfg.seed)}
                if name == "random_search":    # the masking check on random search's own first-step proposals
                    rec["gradient_fidelity"] = gcg.gradient_fidelity(
                        victim, t["ids"], a, forbidden, torch.Generator().manual_seed(cfg.seed * 100_003 + t["doc"]))
                rec["success"] = rec["rel_delta_nll"] > a.success_threshold
                rec["success_abs"] = rec["abs_delta_nll"] > a.success_abs_nats
                once.put(arm, path, rec, part=f"doc{t['doc']}", every_rank=True)
            records.append(rec)
        stop_after(stop, f"stage 6 ({name})", f"{arm}'s text {i + 1}")
    if kept:
        say(f"[{name}] {arm:<15} {kept} text(s) attacked before: kept")
    draws = [hotflip.random_flips(t["ids"], r["n_flips"], forbidden,
                                  torch.Generator().manual_seed(cfg.seed * 100_003 + t["doc"]))
             for t, r in zip(mine, records)]
    controls = [{"doc": t["doc"], "adversarial_ids": d["adversarial_ids"], "modified_positions": d["modified_positions"],
                 **s} for t, d, s in zip(mine, draws, hotflip.rescore(victim, draws))]
    records, controls = distributed.gather_shares(records), distributed.gather_shares(controls)
    entry = {"path": paths.rel(path), "label": arm_label(paths, arm),
             "summary": _summary(records, a.success_threshold),
             "random_control": _summary(controls, a.success_threshold),
             "seconds_per_example": (time.time() - t0) / (len(mine) - kept) if len(mine) > kept else None,
             "examples": records, "control_examples": controls}
    s, c = entry["summary"], entry["random_control"]
    say(f"[{name}] {arm:<15} success {100 * s['success_rate']:5.1f}%  mean dNLL {s['mean_abs_delta_nll']:+.3f} "
        f"(random flips: {100 * c['success_rate']:5.1f}%, {c['mean_abs_delta_nll']:+.3f}); "
        f"{s['cost']['forward_passes'] / s['n']:,.0f} exact forward passes per text")
    once.put(arm, path, entry)
    once.drop_parts(arm, path)
    stop_after(stop, f"stage 6 ({name})", arm)
    return entry


def _write_search(cfg: ExperimentConfig, paths: RunPaths, name: str, models: dict, transfer: dict) -> str:
    a, compute = cfg.attack, Compute.from_config(cfg.device, cfg.precision)
    test = TokenFile(paths.shared / "tokens", "test")
    path = paths.results / f"{name}.json"
    if distributed.is_main():
        write_json(path, {"attack": name, "composition": _composition(name, a), "config": vars(a),
                          "seed": cfg.seed, "compute": compute.describe(), "processes": distributed.world_size(),
                          "token_file": paths.rel(test.path), "success_threshold": a.success_threshold,
                          "success_abs_nats": a.success_abs_nats,
                          "loss": "mean next-token NLL over unmodified text tokens of [EOS] + text; "
                                  "clean and attacked on the same positions",
                          "cost": "per record: exact sequences (and tokens) run forward, and forward + backward "
                                  "for embedding gradients, by the search and its final rescoring",
                          "models": models, "transfer": transfer})
    return str(path)


WORST_FIELDS = ("clean_nll", "attacked_nll", "abs_delta_nll", "rel_delta_nll", "success", "success_abs", "n_flips",
                "original_ids", "adversarial_ids", "modified_positions")


def worst_of(done: dict[str, dict], arm: str) -> list[dict]:
    """Per text every search of WORST_CASE_SEARCHES attacked, the most damaging record and its search."""
    by_attack = {name: {r["doc"]: r for r in models[arm]["examples"]} for name, models in done.items()
                 if name in WORST_CASE_SEARCHES}
    docs = sorted(set.intersection(*(set(d) for d in by_attack.values())))
    out = []
    for doc in docs:
        name = max(by_attack, key=lambda n: by_attack[n][doc]["abs_delta_nll"])
        out.append({"doc": doc, "attack": name, **{k: by_attack[name][doc][k] for k in WORST_FIELDS}})
    return out


def _worst_arm(cfg: ExperimentConfig, paths: RunPaths, arm: str, path: Path, model, done: dict) -> dict:
    """One arm's worst case per text over the searches of stage 6, and the check for gradient masking: the
    fraction of MLP inputs in the clamp's flat region, per layer, on the attacked texts and on their worst-case
    adversarial versions."""
    a, compute = cfg.attack, Compute.from_config(cfg.device, cfg.precision)
    worst = worst_of(done, arm)
    entry = {
        "path": paths.rel(path), "label": arm_label(paths, arm), "examples": worst,
        "summary": _summary(worst, a.success_threshold),
        "won_by": {name: sum(r["attack"] == name for r in worst) for name in done if name in WORST_CASE_SEARCHES},
        "flat_region": {"clean": flat_fractions(model, [torch.tensor(r["original_ids"]) for r in worst], compute.device, a.batch_size),
                        "adversarial": flat_fractions(model, [torch.tensor(r["adversarial_ids"]) for r in worst],
                                                      compute.device, a.batch_size)}}
    f = entry["flat_region"]["clean"]
    say(f"[worst case] {arm:<15} mean dNLL {entry['summary']['mean_abs_delta_nll']:+.3f} "
        f"(won by {', '.join(f'{n} {c}' for n, c in entry['won_by'].items() if c)}); MLP inputs below the "
        f"clamp {100 * f['mean']:.1f}% ({'flat' if f['flat_region'] else 'no clamp'})")
    return entry


def _write_worst_case(cfg: ExperimentConfig, paths: RunPaths, models: dict, done: dict) -> str:
    a = cfg.attack
    path = paths.results / "worst_case.json"
    if distributed.is_main():
        write_json(path, {"attacks": list(done), "seed": cfg.seed, "success_threshold": a.success_threshold,
                          "success_abs_nats": a.success_abs_nats,
                          "searches": [n for n in WORST_CASE_SEARCHES if n in done],
                          "rule": "per text attacked by every search of `searches` (the same for every arm; GCG "
                                  "through the surrogate is the masking check, not a search of the worst case): "
                                  "the record of largest abs_delta_nll",
                          "flat_region": "fraction of the MLP activation's inputs below x* = GELU's argmin, per layer, "
                                         "over every position; the gradient is exactly 0 there where flat_region is true",
                          "models": models})
    return str(path)


def _pgd_arm(cfg: ExperimentConfig, paths: RunPaths, arm: str, path: Path, model) -> dict:
    """PGD on the input embeddings at every radius (pgd.py), on the first pgd_texts texts; the best
    perturbations in pgd_deltas/<arm>.safetensors (a fresh forward pass with them reproduces each record)."""
    from safetensors.torch import save_file
    a, compute = cfg.attack, Compute.from_config(cfg.device, cfg.precision)
    tokenizer = load_tokenizer(paths.shared / "tokenizer")
    texts = attacked_texts(cfg, paths, a.pgd_texts)
    share = distributed.my_share(len(texts))
    out_dir = paths.results / "pgd_deltas"
    victim = Victim(model, compute, a.batch_size, surrogate_gradient=a.surrogate_gradient)
    forbidden = forbidden_tokens(tokenizer, victim.embeddings.shape[0])
    unit, swap = pgd.mean_embedding_norm(victim, forbidden), pgd.nearest_swap_distance(victim, forbidden)
    records, deltas = [], {}
    for t in texts[share.start:share.stop]:
        for radius in numbers(a.pgd_radii):
            rec, delta = pgd.attack_text(victim, t["ids"], radius, unit, a.pgd_steps)
            records.append({"doc": t["doc"], "ids": t["ids"].tolist(), **rec})
            deltas[f"{t['doc']}@{radius:g}"] = delta.contiguous()
    records = distributed.gather_shares(records)
    deltas = {k: v for part in distributed.gather_objects(deltas) for k, v in part.items()}
    if distributed.is_main():        # atomic, and readable as the umask allows (safetensors writes 0600)
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{arm}.", suffix=".safetensors")
        os.close(fd)
        save_file(deltas, tmp)
        publish(Path(tmp), out_dir / f"{arm}.safetensors")
    entry = {"path": paths.rel(path), "label": arm_label(paths, arm), "mean_embedding_norm": unit,
             "nearest_swap_distance": swap, "radius_in_swaps": {f"{r:g}": r * unit / swap for r in numbers(a.pgd_radii)},
             "deltas_file": paths.rel(out_dir / f"{arm}.safetensors"), "examples": records,
             "by_radius": {f"{r:g}": _summary([x for x in records if x["radius"] == r], a.success_threshold)
                           for r in numbers(a.pgd_radii)}}
    say(f"[pgd] {arm:<15} mean dNLL " + ", ".join(
        f"r={r} {s['mean_abs_delta_nll']:+.3f}" for r, s in entry["by_radius"].items()))
    return entry


def _write_pgd(cfg: ExperimentConfig, paths: RunPaths, models: dict) -> str:
    a, compute = cfg.attack, Compute.from_config(cfg.device, cfg.precision)
    path = paths.results / "pgd.json"
    if distributed.is_main():
        write_json(path, {"attack": "pgd", "composition": pgd.composition(a), "config": vars(a), "seed": cfg.seed,
                          "compute": compute.describe(), "radii": numbers(a.pgd_radii),
                          "loss": "mean next-token NLL of the text tokens of [EOS] + text, embeddings + delta",
                          "models": models})
    return str(path)
