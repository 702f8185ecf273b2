"""Named presets (the tiny CPU preset and the Pythia family, paper recipe) and `load_config`:
a preset by name with `--set`/`MONO__` overrides applied, validated."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import fields

from configs.experiment_config import (AttackConfig, ConfigError, DataConfig, EvalConfig, ExperimentConfig, ModelConfig,
                                       TrainConfig)


# -- presets -------------------------------------------------------------------

def _tiny() -> ExperimentConfig:
    cfg = ExperimentConfig(preset="tiny")
    # The stdlib corpus holds ~0.24M training tokens: the pretraining below takes
    # ~2.2 passes over them and each recovery ~1.1 (every training run prints its count).
    cfg.data.max_epochs = 3.0
    # Docstrings repeat each other (overloads, subclasses): held-out near-copies of training text are removed.
    cfg.data.heldout_overlap = "drop"
    # Sized from REFERENCE.md: ~3k tokens/s for this model on 2 CPU cores.
    cfg.pretrain = TrainConfig(max_tokens=520_000, micro_batch_size=16, lr=3e-3,
                               warmup_fraction=0.05, weight_decay=0.1)
    # Same budget for both recoveries; the monotone copy starts far worse
    # (|W| init) and gets the paper's 5x larger learning rate and longer warmup.
    recovery = dict(max_tokens=260_000, micro_batch_size=16, eval_interval=20, eval_windows=64,
                    checkpoint_every_steps=20, weight_decay=0.01, schedule="wsd", cooldown_fraction=0.2)
    # The recipe search (every arm by the same rule; utils/recovery.py's lr_sweep): each value trains the full
    # run's first half and a cooldown, and the best two go on to the full budget, where the lower loss wins. The
    # horizon is measured (seed 42, docs/ablations.md): the baseline's full runs at 1e-4 ... 1e-2 reached
    # validation loss 4.925, 4.883, 4.776, 4.672, 4.695; a prefix of 40k tokens ranked 1e-4 first and one of 80k
    # 3e-4, 130k ranked 3e-3 first; unconstrained_from_init's full runs at 1e-3, 3e-3, 1e-2: 4.880, 4.805, 4.848,
    # its 130k prefixes 4.992, 5.004, 5.103 (1e-3 first): the full length decides. Half-decades; a winning edge
    # is extended; 0 (the pretrained model) is a candidate for the baseline.
    search = dict(sweep_tokens=130_000, lr_grid_extensions=2, lr_confirm=2)
    cfg.recovery_baseline = TrainConfig(lr=3e-3, warmup_fraction=0.1, lr_grid="0,1e-3,3e-3,1e-2", **recovery, **search)
    cfg.recovery_monotone = TrainConfig(lr=3e-3, warmup_fraction=0.2, lr_grid="1e-3,3e-3,1e-2", **recovery, **search)
    # Controls of the monotone arm's own history: its start trained without the constraint for the full budget
    # (unconstrained_from_init) and for 1/4, 1/2 and 3/4 of it, each to its own horizon (the ladder). With the
    # baseline they are the frontier the verdict is read from. Seed 42's monotone arm (validation loss 4.96) lay
    # between unconstrained_from_init's run at 1/2 and 3/4 of its budget (5.04 and 4.91). Snapshots of the
    # pretraining (controls.pretrain_snapshots) remain available as extra points of another history.
    cfg.controls.unconstrained_from_init = True
    cfg.controls.ladder = "0.25,0.5,0.75"
    cfg.analysis.frontier = "same_history"
    return cfg


def _pythia(size: str) -> ExperimentConfig:
    cfg = ExperimentConfig(preset=f"pythia-{size}", device="cuda")
    # Released weights are fp16; they are loaded as fp32 master weights (precision governs compute).
    cfg.model = ModelConfig(source="hub", hub_id=f"EleutherAI/pythia-{size}", vocab_size=50304, context_length=2048)
    # The mirror ships separate val and test files (trap 5: never score train documents).
    cfg.data = DataConfig(source="hub", hub_id="monology/pile-uncopyrighted",
                          train_file="train/00.jsonl.zst", val_file="val.jsonl.zst",
                          test_file="test.jsonl.zst", min_chars=1, seq_len=2048, quick=False,
                          val_docs=1_000, test_docs=10_000, quick_val_docs=200, quick_test_docs=1_000)
    # Paper recipe (REFERENCE.md): effective batch 32 x 2048 (8 x 4 accumulation),
    # AdamW wd 0.01, clip 1.0, gradient checkpointing; baseline lr 1e-5 warmup 10%,
    # monotone lr 5e-5 warmup 20%. The paper gave the monotone copy 10 epochs and
    # the baseline 5 of 90k documents truncated and padded to 2048; here both get
    # the same budget, the paper's 10 x 90k x 2048 = 1.84B token positions, as
    # packed distinct tokens in one pass (stage 0 reads as many documents as that
    # takes; README "Budgets"). Set both max_tokens to change it.
    recovery = dict(max_tokens=10 * 90_000 * 2048, micro_batch_size=8, grad_accum_steps=4,
                    weight_decay=0.01, grad_clip=1.0, min_lr_fraction=0.0, log_interval=10,
                    eval_interval=500, eval_windows=256, checkpoint_every_steps=500,
                    checkpoint_every_minutes=30.0, keep_checkpoints=2, gradient_checkpointing=True)
    # The recipe search brackets the paper's two learning rates (every arm by the same rule; 0, the pretrained
    # model, is a candidate for the baseline); each value trains the full run's first 57.6M tokens (1/32) and a
    # cooldown, and the winner's full run goes on from its prefix: no more GPU-hours than the former search
    # (3 x 50M). A short horizon: on tiny, prefixes of 15% and 31% of the run ranked the baseline's rates wrongly
    # and 50% rightly, so this one's choice is unverified at this scale (raise sweep_tokens where hours allow).
    search = dict(sweep_tokens=57_600_000, lr_grid_extensions=2, schedule="wsd", cooldown_fraction=0.2)
    cfg.recovery_baseline = TrainConfig(lr=1e-5, warmup_fraction=0.1, lr_grid="0,5e-6,2e-5,1e-4", **recovery, **search)
    cfg.recovery_monotone = TrainConfig(lr=5e-5, warmup_fraction=0.2, lr_grid="5e-6,2e-5,1e-4", **recovery, **search)
    # Controls of the monotone arm's own history: its start trained without the constraint (a second stage-3
    # recovery per seed) and a ladder of shorter runs, each to its own horizon. Released Pythia checkpoints do not
    # bracket the monotone arm (step4000's LAMBADA perplexity is ~44 mid-warmup, step16000's 13.5; the paper's
    # monotone arm sits near 36), so none is measured by default: controls.revisions=step4000,... adds them as
    # extra points (stage 0 records each one's validation loss and refuses a list whose loss does not rise
    # as the step falls). Two rungs, 1/32 and 1/8 of the budget, where the revisions' three measured arms were;
    # stage 3 adds up to two more (half the smallest while it is better than the monotone arm, twice the largest
    # while it is worse) to bracket it closely. Counted: `bash run_all.sh --dry-run --preset pythia-1.4b`.
    cfg.controls.unconstrained_from_init = True
    cfg.controls.ladder = "0.03125,0.125"
    cfg.analysis.frontier = "same_history"
    # Full 2048-token windows; stride 1024 gives every token at least 1024 tokens
    # of context (stride 2048 would be lm-evaluation-harness's windows, half the cost).
    cfg.eval = EvalConfig(max_len=2048, stride=1024, batch_size=8, task_batch_size=8,
                          tasks="lambada_openai,piqa,arc_easy,arc_challenge,winogrande,hellaswag,sciq")
    # Paper sizes: HotFlip 200 documents, 10 flips, 15% threshold; UAT trigger
    # of 10, 3 restarts x 50 sweeps, 80 texts to optimise, 120 to evaluate; UAT
    # candidates screened on 10 texts, the best 8 checked on all 80.
    # Search budgets (docs/measurement.md, "The attack pilot"), within ~50 A100-hours of stage 6 per seed (counted,
    # scripts/time_limits.py; twice the former 64 x 64 on 100 texts): GCG 64 steps x 256 swaps, nanoGCG's top-k 256
    # (16,384 exact passes per text; nanoGCG's 250 x 512 is 7.8x more, HarmBench's 500 x 512 15.6x), on the first
    # 50 of HotFlip's texts; the tiny pilot found width worth more than steps at equal passes. HotFlip top-k 64
    # (was 20; on tiny each doubling to 4x still added). `run_all.sh --pilot` brackets them (up to 256 x 512,
    # nanoGCG's budget) before training: apply its --set lines.
    cfg.attack = AttackConfig(text_len=256, min_text_len=64, batch_size=32,
                              uat_opt_texts=80, uat_eval_texts=120, uat_trigger_len=10, uat_restarts=3,
                              uat_max_sweeps=50, uat_top_k=100, uat_beam=1, uat_screen_texts=10, uat_screen_keep=8,
                              hotflip_texts=200, hotflip_max_flips=10, hotflip_top_k=64, hotflip_beam=2,
                              gcg_texts=50, gcg_steps=64, gcg_search_width=256, gcg_top_k=256,
                              success_threshold=0.15)
    return cfg


# -- overrides -----------------------------------------------------------------

def _coerce(raw: str, typ, key: str):
    if typ is bool or typ == "bool":
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {raw!r}")
    try:
        if typ in (int, "int"):
            return int(raw.replace("_", ""))
        if typ in (float, "float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{key}: expected {getattr(typ, '__name__', typ)}, got {raw!r}") from None
    return raw


def apply_override(cfg: ExperimentConfig, key: str, raw: str) -> None:
    """Set `section.field` (or a top-level field) from its string form."""
    parts = key.split(".")
    target = cfg
    for part in parts[:-1]:
        sub = getattr(target, part, None)
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"unknown config section {part!r} in {key!r}; sections: "
                              + ", ".join(f.name for f in fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))))
        target = sub
    by_name = {f.name: f for f in fields(target)}
    leaf = parts[-1]
    if leaf not in by_name or dataclasses.is_dataclass(getattr(target, leaf)):
        valid = ", ".join(n for n in by_name if not dataclasses.is_dataclass(getattr(target, n)))
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {valid}")
    setattr(target, leaf, _coerce(raw, by_name[leaf].type, key))


def env_overrides(environ=None) -> list[tuple[str, str]]:
    """`MONO__TRAIN__LR=1e-4` -> ("train.lr", "1e-4"); top level: `MONO__SEED=1`."""
    environ = os.environ if environ is None else environ
    out = []
    for name, value in sorted(environ.items()):
        if name.startswith("MONO__"):
            out.append((name[len("MONO__"):].lower().replace("__", "."), value))
    return out


def parse_sets(items: list[str]) -> list[tuple[str, str]]:
    """`--set KEY=VALUE` arguments as (key, raw value) pairs."""
    pairs = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        pairs.append(tuple(item.split("=", 1)))
    return pairs


TINY_ARCHITECTURE = ("n_layer", "d_model", "n_head", "d_ff", "vocab_size", "context_length")

PRESETS = {
    "tiny": _tiny,
    "pythia-410m": lambda: _pythia("410m"),
    "pythia-1.4b": lambda: _pythia("1.4b"),
    "pythia-2.8b": lambda: _pythia("2.8b"),
    "pythia-6.9b": lambda: _pythia("6.9b"),
}


def load_config(preset: str, overrides: list[tuple[str, str]] = (), environ=None) -> ExperimentConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    for key, raw in [*env_overrides(environ), *overrides]:
        apply_override(cfg, key, raw)
    cfg.validate()
    if cfg.model.source != "tiny":      # a hub or local model brings its own architecture (config.json)
        own = PRESETS[preset]().model
        changed = [f"model.{n}" for n in TINY_ARCHITECTURE if getattr(cfg.model, n) != getattr(own, n)]
        if changed:
            raise ConfigError(f"{', '.join(changed)} describe the tiny model built here; with "
                              f"model.source={cfg.model.source} the model's own config.json decides them")
    return cfg
