"""Stages 2 and 3: recovery training of the baseline and the monotone copy, and the monotone copy's controls of
the same history (its start without the constraint: controls.unconstrained_from_init at the full budget, the
ladder at shorter ones).

Every arm goes through utils.train.training.train with the same data, data order
(the experiment seed) and, in the presets, the same token budget; only the
starting model and the recipe differ. A recipe with an lr_grid first runs the
recipe search (lr_sweep), by the same rule for every arm. Under torchrun every
rank trains its shard; rank 0 gathers the whole model and writes everything else.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import shutil
from pathlib import Path

from configs.experiment_config import ExperimentConfig, TrainConfig, numbers
from utils.data.tokenization import TokenFile, load_tokenizer
from utils.model.modeling import SavedWeights, empty_model, load_model, save_model
from utils.model.monotonicity import certify, release_constraint
from utils.run import distributed
from utils.run.compute import Compute
from utils.run.run_files import PipelineError, RunPaths, read_json, write_json
from utils.run.signals import StopOnSignal
from utils.stages import certificate_probe, pretrained_model, read_manifest
from utils.train.checkpoint import Checkpointer
from utils.train.movement import freeze_all_but_constrained, movement_report
from utils.train.training import train, validation_loss

# Config sections each arm's outputs depend on (completion flag and checkpoint fingerprint).
SECTIONS = {"baseline": ("model", "data", "pretrain", "recovery_baseline", "precision"),
            "monotonic": ("model", "data", "pretrain", "monotone", "recovery_monotone", "precision")}
SECTIONS["unconstrained_from_init"] = SECTIONS["monotonic"]
STAGE_3_SECTIONS = (*SECTIONS["monotonic"], "controls")      # the flag also covers whether the control trains


def arm_recipe(cfg: ExperimentConfig, arm: str) -> TrainConfig:
    """The baseline's recipe, or the monotone one (which its unconstrained controls share)."""
    return cfg.recovery_baseline if arm == "baseline" else cfg.recovery_monotone


def is_released(arm: str) -> bool:
    """The arms trained from the monotone start without its constraint: unconstrained_from_init and the ladder."""
    return arm == "unconstrained_from_init" or arm.startswith("ladder_")


def checkpoint_dir(paths: RunPaths, arm: str) -> Path:
    return paths.seed_dir / "checkpoints" / arm


def train_monotonic(cfg: ExperimentConfig, paths: RunPaths) -> list[str]:
    """Stage 3: the monotone arm, then (controls.unconstrained_from_init) its unconstrained control, then
    (controls.ladder) the controls of the same history at shorter budgets."""
    out = recover(cfg, paths, "monotonic")
    if cfg.controls.unconstrained_from_init:
        out += recover(cfg, paths, "unconstrained_from_init")
    if cfg.controls.ladder:
        out += train_ladder(cfg, paths)
    return out


def trained(paths: RunPaths, arm: str, key: str) -> float:
    """A number of an arm's training record (its lr, its final validation loss), on every rank as rank 0 read it."""
    record = read_json(paths.results / f"training_{arm}.json") if distributed.is_main() else None
    value = {"lr": lambda r: r["recipe"]["lr"], "val_loss": lambda r: r["history"]["val_loss"]}[key](record) \
        if record else 0.0
    return distributed.sum_across(value)[0]


def train_ladder(cfg: ExperimentConfig, paths: RunPaths) -> list[str]:
    """Controls of the monotone arm's own history: its start, released, trained for each fraction of controls.ladder
    of the full budget at unconstrained_from_init's chosen lr, each to its own horizon (the recipe's warmup and
    decay fractions of its own steps), on the same first tokens in the same order. The smallest rung goes first;
    while its validation loss is below the monotone arm's (nothing of this history brackets the monotone arm from
    above), a rung of half its budget is added; after the others, while the largest one's loss is above the
    monotone arm's, one of twice its budget (below the full budget): controls.ladder_extensions additions at most.
    results/ladder.json lists the rungs stages 4-6 measure and whether they bracket the monotone arm."""
    c, full = cfg.controls, cfg.recovery_monotone.max_tokens
    lr = trained(paths, "unconstrained_from_init", "lr")
    target = trained(paths, "monotonic", "val_loss")
    planned = cfg.ladder_tokens()
    per_step = cfg.recovery_monotone.micro_batch_size * cfg.recovery_monotone.grad_accum_steps * cfg.data.seq_len
    rungs, out = {}, []

    def fewer_steps(tokens: int, than: int) -> bool:      # a rung of fewer whole optimizer steps (not a copy)
        return -(-tokens // per_step) < -(-than // per_step)

    def train_rung(tokens: int, added: bool) -> None:
        recipe = dataclasses.replace(cfg.recovery_monotone, lr=lr, max_tokens=tokens, lr_grid="", sweep_tokens=0)
        out.extend(recover(cfg, paths, f"ladder_{tokens}", recipe))
        rungs[tokens] = {"arm": f"ladder_{tokens}", "tokens": tokens, "fraction": tokens / full, "added": added,
                         "val_loss": trained(paths, f"ladder_{tokens}", "val_loss")}

    def extensions_left() -> bool:
        return sum(r["added"] for r in rungs.values()) < c.ladder_extensions

    train_rung(planned[0], False)
    while rungs[min(rungs)]["val_loss"] < target and extensions_left() and fewer_steps(min(rungs) // 2, min(rungs)):
        train_rung(min(rungs) // 2, True)             # the smallest is still better than the monotone arm: below it
    for tokens in planned[1:]:
        train_rung(tokens, False)
    while rungs[max(rungs)]["val_loss"] > target and extensions_left() and fewer_steps(2 * max(rungs), full) \
            and fewer_steps(max(rungs), 2 * max(rungs)):
        train_rung(2 * max(rungs), True)              # the largest is still worse: between it and the full run
    losses = [r["val_loss"] for r in rungs.values()] + [trained(paths, "unconstrained_from_init", "val_loss")]
    report = {"rule": "unconstrained recoveries from the monotone start at fractions of its budget, each to its own "
                      "horizon at unconstrained_from_init's lr; the smallest halved while its validation loss is "
                      "below the monotone arm's, the largest doubled (below the full budget) while above it, "
                      f"{c.ladder_extensions} additions at most",
              "lr": lr, "full_tokens": full, "monotonic_val_loss": target,
              "unconstrained_from_init_val_loss": losses[-1],
              "rungs": [rungs[t] for t in sorted(rungs)],
              "bracketed": min(losses) <= target <= max(losses)}
    if distributed.is_main():
        write_json(paths.results / "ladder.json", report)
        print("[ladder] " + ", ".join(f"{r['tokens']:,} tokens -> {r['val_loss']:.4f}" for r in report["rungs"])
              + f", unconstrained_from_init -> {losses[-1]:.4f}; monotonic {target:.4f}: "
              + ("bracketed" if report["bracketed"] else "NOT bracketed by its own history (stage 7 reads the "
                 "verdict against the frontier's range and says so)"))
    return out + [str(paths.results / "ladder.json")]


def next_lr(lr: float, up: bool) -> float:
    """Half a decade beyond `lr` (x or / sqrt(10)), on the 1-3 grid: 1e-4 -> 3e-4 up, 3e-5 down."""
    x = math.log10(lr) + (0.5 if up else -0.5)
    e = math.floor(x)
    return min((float(f"{m}e{k}") for k in (e, e + 1) for m in (1, 3)), key=lambda v: abs(math.log10(v) - x))


def sweep_steps(recipe: TrainConfig, seq_len: int) -> tuple[int, int]:
    """(k, c): the optimizer steps of the recipe search's prefix (sweep_tokens) and of its cooldown."""
    per_step = recipe.micro_batch_size * recipe.grad_accum_steps * seq_len
    k = max(1, round(recipe.sweep_tokens / per_step))
    return k, max(1, round(recipe.cooldown_fraction * k))


def sweep_checkpointer(cfg: ExperimentConfig, paths: RunPaths, arm: str, lr: float) -> Checkpointer:
    """Where a value of the recipe search keeps its prefix: the chosen one's full run goes on from it."""
    recipe = arm_recipe(cfg, arm)
    return Checkpointer(checkpoint_dir(paths, arm) / f"lr_{lr:g}", cfg.fingerprint(SECTIONS[arm], extra=f"lr {lr!r}"),
                        recipe.keep_checkpoints)


def lr_sweep(cfg: ExperimentConfig, paths: RunPaths, arm: str, load_start, train_tok, val_tok, compute,
             stop: StopOnSignal) -> dict:
    """The recipe search, by the same rule for every arm. Each lr trains the first sweep_tokens of the full run
    (the same start, tokens, order and schedule: with schedule=wsd a constant-rate prefix), then a cooldown of
    cooldown_fraction of those steps to the floor; the lowest validation loss after it wins. Why this horizon:
    a short run's own schedule (a truncated cosine) ranks lrs for its horizon, not the full run's, and favoured
    small rates for a converged start; a prefix of the full run plus a cooldown estimates the loss of the full
    run's own schedule stopped there, and the winner's full run goes on from its prefix, so the horizon can be
    long for the cost of the losers alone. While the winner is the largest or smallest positive value, one half
    a decade beyond is added (lr_grid_extensions at most). With lr_confirm > 1 the best values by that loss go
    on to the full budget and the full-length loss decides (on tiny half the run still ranked the damaged
    start's rates wrongly). lr 0 is the start model (its validation loss, no training). Each finished value is kept (lr_sweep.json in the arm's checkpoint dir) and each prefix is
    checkpointed, so a requeued job goes on where it stopped (`stop` is polled from the first step on)."""
    recipe = arm_recipe(cfg, arm)
    record = checkpoint_dir(paths, arm) / "lr_sweep.json"
    fingerprint = cfg.fingerprint(SECTIONS[arm])
    kept = read_json(record) if record.exists() else {}
    rows = {r["lr"]: r for r in kept.get("rows", [])} if kept.get("fingerprint") == fingerprint else {}
    k, c = sweep_steps(recipe, cfg.data.seq_len)
    per_step = recipe.micro_batch_size * recipe.grad_accum_steps * cfg.data.seq_len

    def measure(lr: float) -> None:
        if lr in rows:
            return
        if lr == 0:
            val = validation_loss(load_start(), val_tok.tokens, cfg.data.seq_len, recipe.micro_batch_size,
                                  recipe.eval_windows, compute)
        else:
            ck = sweep_checkpointer(cfg, paths, arm, lr)
            val = train(load_start(), train_tok.tokens, val_tok.tokens, dataclasses.replace(recipe, lr=lr),
                        cfg.data.seq_len, cfg.seed, compute, desc=f"{arm} lr {lr:g}", max_epochs=cfg.data.max_epochs,
                        checkpointer=ck, stop=stop, on_best=ck.save_best, branch=(k, c))["val_loss"]
        rows[lr] = {"lr": lr, "prefix_tokens": k * per_step if lr else 0, "cooldown_tokens": c * per_step if lr else 0,
                    "val_loss": val}
        if distributed.is_main():
            record.parent.mkdir(parents=True, exist_ok=True)
            write_json(record, {"fingerprint": fingerprint, "rows": sorted(rows.values(), key=lambda r: r["lr"])})

    grid = numbers(recipe.lr_grid)
    for lr in grid:
        measure(lr)
    added = []
    while len(added) < recipe.lr_grid_extensions:
        best = min(rows.values(), key=lambda r: r["val_loss"])["lr"]
        positive = sorted(lr for lr in rows if lr > 0)
        if best not in (positive[0], positive[-1]) or best == 0:
            break
        added.append(next_lr(best, up=best == positive[-1]))
        measure(added[-1])
    # The best lr_confirm values (by the prefix's loss) go on to the full budget from their prefixes: the lowest
    # full-length loss wins (lr 0's full length is the start model itself). The winner's run is then done.
    confirmed = sorted(rows.values(), key=lambda r: r["val_loss"])[:recipe.lr_confirm] if recipe.lr_confirm > 1 else []
    for r in confirmed:
        if "full_val_loss" not in r:
            ck = sweep_checkpointer(cfg, paths, arm, r["lr"])
            r["full_val_loss"] = r["val_loss"] if r["lr"] == 0 else train(
                load_start(), train_tok.tokens, val_tok.tokens, dataclasses.replace(recipe, lr=r["lr"]),
                cfg.data.seq_len, cfg.seed, compute, desc=f"{arm} lr {r['lr']:g} (confirming)",
                max_epochs=cfg.data.max_epochs, checkpointer=ck, stop=stop, on_best=ck.save_best)["val_loss"]
            if distributed.is_main():
                write_json(record, {"fingerprint": fingerprint, "rows": sorted(rows.values(), key=lambda x: x["lr"])})
    best = min(confirmed, key=lambda r: r["full_val_loss"])["lr"] if confirmed else \
        min(rows.values(), key=lambda r: r["val_loss"])["lr"]
    positive = sorted(lr for lr in rows if lr > 0)
    on_edge = best in (positive[0], positive[-1])
    if distributed.is_main():      # the other values' prefixes are not needed (a checkpoint is ~16 bytes a parameter)
        for lr in positive:
            if lr != best:
                shutil.rmtree(sweep_checkpointer(cfg, paths, arm, lr).dir, ignore_errors=True)
        print(f"[{arm}] lr sweep ({k * per_step:,} tokens of the full run + {c * per_step:,} of cooldown each): "
              + ", ".join(f"{r['lr']:g} -> {r['val_loss']:.4f}" for r in sorted(rows.values(), key=lambda r: r["lr"]))
              + "".join(f"; lr {r['lr']:g} at full length -> {r['full_val_loss']:.4f}" for r in confirmed)
              + f"; training at lr {best:g}" + (" (the start model: no training)" if best == 0 else "")
              + (" (STILL ON AN EDGE of the grid after its extensions)" if on_edge else ""))
    return {"rule": "lowest validation loss after the full run's first sweep_tokens and a cooldown of "
                    "cooldown_fraction of them; the grid extended half a decade past an edge that wins"
                    + (f"; the best {recipe.lr_confirm} then trained to the full budget, the lowest final validation "
                       "loss chosen" if confirmed else ""), "confirmed": [r["lr"] for r in confirmed],
            "sweep_tokens": k * per_step, "cooldown_tokens": c * per_step, "grid": grid, "added": added,
            "rows": sorted(rows.values(), key=lambda r: r["lr"]), "chosen_lr": best, "chosen_on_edge": on_edge,
            "start_is_best": best == 0}


def recover(cfg: ExperimentConfig, paths: RunPaths, arm: str, recipe: TrainConfig | None = None) -> list[str]:
    """Train one arm (its recipe search first, unless `recipe` is given: a ladder rung's); write its models
    (last and best) and results/training_<arm>.json."""
    # SLURM's warning (USR1), TERM and Ctrl-C from here on, the recipe search included; a second arm's handlers
    # replace the first's (they are process-wide), so no finished arm's handler swallows a signal.
    stop = StopOnSignal()
    rung = recipe is not None
    recipe = recipe or arm_recipe(cfg, arm)
    other = cfg.recovery_monotone if arm == "baseline" else cfg.recovery_baseline
    fingerprint = cfg.fingerprint(SECTIONS["monotonic"], extra=repr(vars(recipe))) if rung else \
        cfg.fingerprint(SECTIONS[arm])
    if recipe.max_tokens != other.max_tokens and distributed.is_main() and not rung:
        print(f"[{arm}] WARNING: recovery budgets differ ({recipe.max_tokens:,} vs {other.max_tokens:,} "
              f"tokens): the baseline/monotone comparison is confounded by training length")
    start_path = pretrained_model(paths) if arm == "baseline" else paths.models / "monotonic_init"
    if not (start_path / "config.json").exists():
        read_manifest(paths)                     # stage 0 missing is the first thing to say
        raise PipelineError(f"no starting model at {start_path}: run stage 1 first")
    compute = Compute.from_config(cfg.device, cfg.precision)
    tokenizer = load_tokenizer(paths.shared / "tokenizer")
    train_tok = TokenFile(paths.shared / "tokens", "train")
    val_tok = TokenFile(paths.shared / "tokens", "val")

    def prepared(m):
        if is_released(arm):
            release_constraint(m)
        if recipe.trainable == "constrained":
            freeze_all_but_constrained(m, cfg.monotone.scope)
        return m

    def load_start(device=None):
        """The starting model, fp32 master weights, whole, on `device` (default: the compute device)."""
        return prepared(load_model(start_path, "float32", device or compute.device))

    def training_start():
        """The model train() starts from. Under torchrun it is sharded, built on the meta device on every
        rank, with only rank 0 reading the weights (N whole copies would need N x the host memory)."""
        if not distributed.active():
            return load_start()
        whole = load_start("cpu").state_dict() if distributed.is_main() else None
        return distributed.shard_from_main(prepared(empty_model(start_path)), whole, compute.device)

    sweep = lr_sweep(cfg, paths, arm, training_start, train_tok, val_tok, compute, stop) if recipe.lr_grid else None
    checkpointer = Checkpointer(checkpoint_dir(paths, arm), fingerprint, recipe.keep_checkpoints)
    if sweep and sweep["start_is_best"]:        # the start model itself: one step at lr 0 changes nothing
        recipe = dataclasses.replace(recipe, lr=0.0, max_tokens=1)
    elif sweep:                                 # the full run goes on from the chosen value's prefix
        recipe = dataclasses.replace(recipe, lr=sweep["chosen_lr"])
        checkpointer = sweep_checkpointer(cfg, paths, arm, sweep["chosen_lr"])
    model = training_start()
    main = distributed.is_main()

    def unsharded(m):
        """The whole trained model on rank 0 (a CPU copy when sharded, filled tensor by tensor), None on the
        others. Collective."""
        if not distributed.is_sharded(m):
            return m
        whole = load_start("cpu") if main else None
        distributed.gather_into(m, whole)
        return whole

    best_dir = paths.models / f"{arm}_best"
    if recipe.trainable == "constrained" and main:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"[{arm}] ablation: only the modules of scope {cfg.monotone.scope} train ({n:,} parameters)")
    if main:
        print(f"[{arm}] recovery training from {start_path}: {recipe.max_tokens:,} tokens, lr {recipe.lr}, "
              f"seed {cfg.seed}, device {compute.device}, precision {compute.precision}, "
              f"{distributed.world_size()} process(es)")
    history = train(model, train_tok.tokens, val_tok.tokens, recipe, cfg.data.seq_len, cfg.seed, compute,
                    desc=arm, checkpointer=checkpointer, stop=stop, on_best=checkpointer.save_best,
                    max_epochs=cfg.data.max_epochs, history_file=paths.results / f"training_{arm}.history.jsonl")
    checkpointer.prune(1)                    # the arm is done: its last checkpoint is all a rerun needs
    model = unsharded(model)
    if not main:
        return []
    # The model stays where training left it: on compute.device, or gathered on the CPU from shards
    # (no second full copy on rank 0's GPU just to certify and save it).
    device = next(model.parameters()).device

    # The start's tensors are read from its files one at a time: rank 0 holds one whole model, the trained one.
    start = SavedWeights(start_path, model)
    report = {"arm": arm, "start_model": paths.rel(start_path), "seed": cfg.seed, "recipe": vars(recipe),
              "lr_sweep": sweep, "constraint": "released (unconstrained control)" if is_released(arm) else None,
              # the world sizes that trained the steps of this result (history["segments"] says which)
              "processes": sorted({s["processes"] for s in history["segments"]}), "history": history, "movement": movement_report(start, model, cfg.monotone.scope),
              "start_val_perplexity": math.exp(history["steps"][0]["val_loss"]),   # the step-0 row
              "final_val_perplexity": math.exp(history["val_loss"]),
              "best": {"step": history["best_step"], "val_loss": history["best_val_loss"], "path": paths.rel(best_dir)}}
    outputs = []
    extra = {"arm": arm, "seed": cfg.seed, "final_val_loss": history["val_loss"]}
    if arm == "monotonic":
        mo = cfg.monotone
        cert = certify(model, mo.scope, trials=mo.cert_trials, seed=mo.cert_seed,
                       input_ids=certificate_probe(cfg, paths).to(device))
        cert["configured_monotone"] = cfg.is_monotone_run
        cert_path = paths.results / "monotonicity_certificate_monotonic.json"
        write_json(cert_path, cert)
        report["certificate"] = {k: cert[k] for k in ("monotone", "min_weight", "total_violations")}
        extra["certificate"] = report["certificate"]
        outputs.append(str(cert_path))
        if cfg.is_monotone_run and not cert["monotone"]:
            raise PipelineError(f"trained model failed its monotonicity certificate: see {cert_path}")
    result_path = paths.results / f"training_{arm}.json"
    write_json(result_path, report)
    save_model(model.cpu(), paths.models / arm, tokenizer, extra=extra)
    # The one export of the best weights (kept sharded during training), into the final model's storage.
    best = checkpointer.load_best_into(model)
    if best.pop("start"):               # nothing beat the start: its own weights, the trained ones dropped first
        model = None
        gc.collect()
        model = load_start("cpu")
    save_model(model, best_dir, tokenizer, extra={"arm": arm, "seed": cfg.seed, **best})
    mv = report["movement"]
    print(f"[{arm}] val perplexity {report['start_val_perplexity']:.1f} -> {report['final_val_perplexity']:.1f}; "
          f"mean |dW| constrained {mv['mean_abs_delta_W_constrained']:.2e}, "
          f"unconstrained {mv['mean_abs_delta_W_unconstrained']:.2e}"
          + (f"; {mv['fraction_V_changed']:.1%} of V changed" if mv["fraction_V_changed"] is not None else ""))
    print(f"[{arm}] relative |dW| by group: " + ", ".join(
        f"{g} {v['relative_delta']:.1%}" for g, v in mv["groups"].items() if v["relative_delta"] is not None))
    return outputs + [str(result_path), str(paths.models / arm), str(best_dir)]
