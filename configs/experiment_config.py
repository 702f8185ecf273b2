"""Typed experiment configuration: one dataclass per concern, named presets.

A run is `ExperimentConfig` = preset + overrides (configs/presets.py applies
them: the environment's `MONO__SECTION__FIELD=value`, then the CLI's
`--set section.field=value`); `validate` reports every problem at once as a
`ConfigError` (stage scripts turn it into exit code 2).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

SCOPES = ("mlp_in", "mlp_both", "mlp_in_attn_out")
ACTIVATION_POLICIES = ("monotone", "keep")
CONSTRUCTIONS = ("softplus_abs", "signed_units", "projected")   # utils/model/monotonicity.py describes each
INITS = ("auto", "abs", "clip")
MODEL_SOURCES = ("tiny", "hub", "local")
PRECISIONS = ("auto", "fp32", "bf16-mixed")
DATA_SOURCES = ("stdlib", "hub", "jsonl", "jsonl.zst", "parquet", "text")
SPLITS = ("train", "val", "test")
HELDOUT_OVERLAP = ("report", "drop")
HELDOUT_TASKS = ("heldout_lastword", "heldout_cloze")   # lm-eval tasks stage 0 builds from the test split
TRAINABLE = ("all", "constrained")
UAT_SEARCHES = ("beam", "gcg")          # Wallace et al.'s left-to-right beam search, or GCG
# Stage 6: searches under HotFlip's threat model. gcg_surrogate: GCG through the exact-GELU surrogate
# gradient (BPDA); random_search: GCG's loop and budget with uniform proposals (no gradient).
TEXT_ATTACKS = ("hotflip", "gcg", "gcg_surrogate", "random_search")
# The searches stage 6's worst case takes, the same for every arm. GCG through the surrogate gradient is left
# out: on arms without the clamp it is GCG's own search (no second draw), so counting it would give the
# clamped arms one independent search more than the others. It stays the gradient-masking check beside it.
WORST_CASE_SEARCHES = ("hotflip", "gcg", "random_search")
SURROGATE_GRADIENTS = ("none", "exact_gelu")     # utils/attacks/masking.py
SCHEDULES = ("cosine", "wsd")                     # TrainConfig.schedule
FRONTIERS = ("same_history", "all")               # AnalysisConfig.frontier


def listed(csv: str) -> list[str]:
    """The names of a comma-separated config value ("hotflip, gcg" -> ["hotflip", "gcg"])."""
    return [n.strip() for n in csv.split(",") if n.strip()]


def numbers(csv: str) -> list[float] | None:
    """Numbers of a comma-separated config value ("" -> []); None if one is not a number."""
    try:
        return [float(v) for v in listed(csv)]
    except ValueError:
        return None


class ConfigError(ValueError):
    """Invalid configuration; the message is one line meant for the user."""


@dataclass
class ModelConfig:
    source: str = "tiny"            # tiny: built and pretrained here; hub: the HF hub (or its cache); local: `path`
    hub_id: str = ""                # e.g. EleutherAI/pythia-1.4b
    revision: str = "main"          # hub branch, tag or commit; the resolved sha goes in the manifest
    path: str = ""                  # source=local: a HF model directory (config.json, safetensors, tokenizer)
    # Architecture of the tiny GPT-NeoX (hub and local models bring their own config.json).
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    d_ff: int = 512
    vocab_size: int = 4096          # also the size of the tiny BPE tokenizer
    context_length: int = 128


@dataclass
class DataConfig:
    source: str = "stdlib"          # see DATA_SOURCES
    hub_id: str = ""                # dataset id when source == hub
    revision: str = "main"
    train_file: str = ""            # a file in the hub dataset, or a local path
    val_file: str = ""
    test_file: str = ""
    text_field: str = "text"        # jsonl / parquet column holding the document
    min_chars: int = 200            # documents shorter than this are dropped
    stdlib_val_fraction: float = 0.1   # stdlib corpus: split by a hash of the document id
    stdlib_test_fraction: float = 0.1
    # Held-out documents sharing more than this fraction of their 12-token n-grams with the training
    # split are near-duplicates (utils/data/overlap.py): always counted in the manifest; "drop" removes them.
    near_duplicate_threshold: float = 0.5
    heldout_overlap: str = "report"  # report | drop
    seq_len: int = 128              # tokens per training / evaluation window
    quick: bool = True              # quick: the quick_* document counts; full: the others
    max_epochs: float = 1.0         # passes over the training tokens a training budget may take (> 1 repeats data)
    train_docs: int = 0             # 0 = as many as one pass of the largest training budget needs
    val_docs: int = 0
    test_docs: int = 0
    quick_train_docs: int = 0
    quick_val_docs: int = 0
    quick_test_docs: int = 0

    def max_docs(self, split: str) -> int:
        prefix = "quick_" if self.quick else ""
        return getattr(self, f"{prefix}{split}_docs")


@dataclass
class TrainConfig:
    """One optimisation recipe (used for the tiny pretraining and both recoveries)."""
    max_tokens: int = 200_000       # budget in training tokens
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_fraction: float = 0.1    # the decay ends at lr * min_lr_fraction
    warmup_fraction: float = 0.05   # of the optimizer steps
    # After the warmup: cosine decay over every remaining step, or wsd (warmup-stable-decay): constant, then a
    # linear decay over the last cooldown_fraction of the steps (a run's prefix is then a constant-rate run
    # whose own cooldown predicts the loss of ending there: the recipe search's horizon).
    schedule: str = "cosine"
    cooldown_fraction: float = 0.2
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_interval: int = 25          # optimizer steps between history rows
    eval_interval: int = 50         # optimizer steps between validation losses
    eval_windows: int = 64          # validation windows of seq_len tokens per evaluation
    checkpoint_every_steps: int = 100
    checkpoint_every_minutes: float = 30.0
    keep_checkpoints: int = 2       # newest K kept
    gradient_checkpointing: bool = False
    trainable: str = "all"          # recoveries: all | constrained (ablation: only the scope's modules train)
    # Recipe search (recoveries, utils/recovery.py): every lr of lr_grid trains the first sweep_tokens of the full
    # run (the same start, tokens and schedule), then a cooldown of cooldown_fraction of those steps; the lowest
    # validation loss after it wins and its full run goes on from that prefix. While the winner is the grid's
    # largest or smallest positive value, a value half a decade beyond is added, lr_grid_extensions times at most.
    # 0 in the grid stands for the start model itself (no training: "the pretrained model is the best baseline").
    lr_grid: str = ""               # comma-separated learning rates, e.g. "0,3e-4,1e-3,3e-3" ("" = lr as given)
    sweep_tokens: int = 0
    lr_grid_extensions: int = 2
    lr_confirm: int = 1             # > 1: the best lr_confirm values by the prefix's loss go on to the full budget
                                    # (from their prefixes); the lowest full-length validation loss wins


@dataclass
class MonotoneConfig:
    scope: str = "mlp_both"         # see SCOPES
    activation: str = "monotone"    # monotone: GELU clamped at its minimum; keep: the paper's GELU
    construction: str = "softplus_abs"   # softplus_abs (the paper's) | signed_units | projected
    init: str = "auto"              # abs: |W| | clip: max(W, 0) | auto: abs, clip for projected
    init_eps: float = 1e-6          # softplus(V0) = init(W_pretrained) + init_eps
    cert_trials: int = 64           # random (x, x + delta) pairs per layer and delta scale
    cert_seed: int = 0


@dataclass
class ControlsConfig:
    """Unconstrained models of known clean loss, measured by stages 4-6 like every arm: the frontier
    of damage against clean loss that stage 7 reads each constrained arm's residual from."""
    # Tiny preset: snapshots of its pretraining after these many training tokens (comma-separated),
    # each a Hugging Face directory shared/models/control_<tokens>.
    pretrain_snapshots: str = ""
    # Hub presets: released training checkpoints of model.hub_id (its stepN revisions), comma-separated;
    # fetched and recorded like the main model (the hub, an offline cache, or model.source=local's path).
    revisions: str = ""
    # Per seed: the monotone arm's damaged start and recipe, trained without the weight constraint.
    unconstrained_from_init: bool = False
    # Controls of the monotone arm's own history (stage 3, after unconstrained_from_init): the same start, released,
    # trained for these fractions of recovery_monotone.max_tokens at unconstrained_from_init's chosen lr, each with
    # its own schedule (warmup and decay to its own horizon), saved as models/ladder_<tokens>. While the smallest
    # rung's validation loss is below the monotone arm's, a rung of half its budget is added; while the largest
    # one's is above it, one of twice its budget (below the full one): ladder_extensions additions at most.
    ladder: str = ""
    ladder_extensions: int = 2
    # Validation windows (data.seq_len tokens) stage 0 measures each of its controls and the main model on, to
    # refuse controls whose loss does not rise as their training step falls.
    check_windows: int = 4


@dataclass
class EvalConfig:
    """Rolling-window perplexity on the test split (utils/measure/perplexity.py states the convention),
    and zero-shot capability tasks through lm-evaluation-harness (utils/measure/capabilities.py)."""
    max_len: int = 128              # tokens the model reads per window (at most its context)
    stride: int = 64                # targets per window after the first; = max_len: lm-eval's windows
    batch_size: int = 16            # windows per forward pass (halved on CUDA OOM, never dropped)
    tasks: str = "heldout_lastword,heldout_cloze"   # lm-eval task names, comma-separated ("" = none)
    task_limit: int = 0             # examples per task (0 = all)
    task_batch_size: int = 16


@dataclass
class AttackConfig:
    """Shared by UAT (stage 5), HotFlip and GCG (stage 6); texts come from the test split."""
    text_len: int = 64              # tokens per attacked text (documents are truncated)
    min_text_len: int = 32          # shorter documents are not attacked
    batch_size: int = 64            # sequences per exact re-evaluation forward pass
    # UAT (Wallace et al. 2019)
    uat_opt_texts: int = 12         # texts the trigger is optimised on
    uat_eval_texts: int = 24        # disjoint texts it is evaluated on
    uat_trigger_len: int = 4
    uat_restarts: int = 2
    uat_search: str = "beam"        # beam (Wallace et al.) | gcg (uses the gcg_* settings)
    uat_max_sweeps: int = 10        # beam: left-to-right sweeps; stops after one without gain (tiny, capped at 10:
                                    # all 24 restarts stopped so, 2 after sweep 5; a cap costs nothing unused)
    uat_top_k: int = 8              # beam: candidate tokens per position (first-order scores)
    uat_beam: int = 2
    # Screening (exact, cheaper): every candidate on the first uat_screen_texts optimisation texts,
    # the best uat_screen_keep on all of them; 0 = every candidate on every text.
    uat_screen_texts: int = 0
    uat_screen_keep: int = 0
    # Stage 6: searches under HotFlip's threat model (Ebrahimi et al. 2018; GCG, Zou et al. 2023)
    text_attacks: str = "hotflip,gcg,gcg_surrogate,random_search"   # comma-separated, see TEXT_ATTACKS
    hotflip_texts: int = 24
    hotflip_max_flips: int = 5      # also GCG's limit on modified tokens (the same threat model)
    hotflip_top_k: int = 64         # (position, token) candidates per beam item and flip (README: 16 -> 32 -> 64
                                    # each added 5-9% on the tiny arms; not plateaued, HotFlip's widest probed)
    hotflip_beam: int = 2
    gcg_texts: int = 24             # GCG attacks the first gcg_texts of HotFlip's texts
    # GCG (nanoGCG's defaults: 250 steps, width 512, top-k 256, buffer 0), scaled to the preset
    gcg_steps: int = 24             # tiny arms: 12 -> 24 adds 1.0-2.6% (the init 9.9%), 24 -> 48 under 5% on all
    gcg_search_width: int = 32      # random single swaps scored exactly per step
    gcg_top_k: int = 32             # tokens per position from the one-hot gradient
    gcg_buffer: int = 0             # 0: continue from each step's best swap; B: from the best of the B best seen
    # The backward pass of every gradient-guided search: none (the model's own) | exact_gelu (BPDA through
    # exact GELU's derivative below the monotone clamp); stage 6's gcg_surrogate always uses exact_gelu.
    surrogate_gradient: str = "none"
    # PGD on the input embeddings (stage 6, pgd.json): the first pgd_texts of HotFlip's texts, an L2 ball
    # per position of each radius (a fraction of the mean embedding norm); "" = off.
    pgd_texts: int = 8
    pgd_radii: str = "0.05,0.1,0.2"
    pgd_steps: int = 10
    success_threshold: float = 0.15  # relative NLL increase counted as a successful attack
    success_abs_nats: float = 0.5   # also reported: success as an absolute increase of the mean NLL (nats/token)


@dataclass
class AnalysisConfig:
    """Stage 7's pre-registered primary test, fixed before any run and printed first everywhere: a constrained
    arm's residual from the unconstrained frontier on one measure, tested across seeds (seed as the unit)."""
    primary_measure: str = "worst_abs_delta_nll"    # a measure of utils/results/frontier.py's MEASURES
    primary_arm: str = "monotonic"                  # monotonic (recovered) | monotonic_init
    alpha: float = 0.05                             # the primary test's level; also the secondary family's (Holm)
    # The unconstrained arms the frontier is fitted to: same_history (the ladder, unconstrained_from_init and the
    # baseline: recoveries of the same kind as the monotone arm) | all (every unconstrained arm, stage 0's controls
    # and the pretrained model too). Arms left out are still measured and plotted.
    frontier: str = "all"


@dataclass
class ExperimentConfig:
    preset: str = "tiny"
    seed: int = 42
    work_dir: str = "work"
    device: str = "auto"            # auto | cpu | cuda
    precision: str = "auto"         # auto (bf16-mixed on CUDA, fp32 on CPU) | fp32 | bf16-mixed (fp32 weights)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)      # tiny preset only
    monotone: MonotoneConfig = field(default_factory=MonotoneConfig)
    controls: ControlsConfig = field(default_factory=ControlsConfig)
    # Recovery recipes: same data and data order (both use `seed`); budgets
    # should be equal for a fair comparison (the stages warn when they differ).
    recovery_baseline: TrainConfig = field(default_factory=TrainConfig)
    recovery_monotone: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    # -- derived --------------------------------------------------------------
    @property
    def is_monotone_run(self) -> bool:
        """False for activation=keep: the paper's GELU is not monotone (trap 1)."""
        return self.monotone.activation == "monotone"

    def ladder_tokens(self) -> list[int]:
        """The budgets of controls.ladder's rungs, ascending, one per whole number of optimizer steps (the first
        fraction of each)."""
        r = self.recovery_monotone
        per_step, by_steps = r.micro_batch_size * r.grad_accum_steps * self.data.seq_len, {}
        for f in sorted(numbers(self.controls.ladder) or []):
            tokens = max(1, round(f * r.max_tokens))
            by_steps.setdefault(-(-tokens // per_step), tokens)
        return list(by_steps.values())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, sections: tuple[str, ...], extra: str = "") -> str:
        """Hash of the config sections (or top-level fields) a stage's output depends on (plus `extra`)."""
        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True) + extra
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> None:
        problems = []
        def need(cond, msg):
            if not cond:
                problems.append(msg)
        m, d, mo = self.model, self.data, self.monotone
        need(self.analysis.primary_arm in ("monotonic", "monotonic_init"),
             f"analysis.primary_arm must be monotonic or monotonic_init, got {self.analysis.primary_arm!r}")
        need(0 < self.analysis.alpha < 1, "analysis.alpha must be in (0, 1)")
        need(self.analysis.frontier in FRONTIERS, f"analysis.frontier must be one of {FRONTIERS}, got {self.analysis.frontier!r}")
        need(self.analysis.frontier != "same_history" or (self.controls.ladder and self.controls.unconstrained_from_init),
             "analysis.frontier=same_history needs controls.ladder and controls.unconstrained_from_init=true (the "
             "same-history controls); set analysis.frontier=all to fit every unconstrained arm")
        need(m.source in MODEL_SOURCES, f"model.source must be one of {MODEL_SOURCES}, got {m.source!r}")
        need(m.source != "hub" or m.hub_id, "model.hub_id is required when model.source=hub")
        need(m.source != "local" or m.path, "model.path is required when model.source=local")
        for name in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size", "context_length"):
            need(getattr(m, name) > 0, f"model.{name} must be > 0")
        need(m.n_head > 0 and m.d_model % m.n_head == 0, "model.d_model must be divisible by model.n_head")
        need(d.source in DATA_SOURCES, f"data.source must be one of {DATA_SOURCES}, got {d.source!r}")
        need(d.source != "hub" or d.hub_id, "data.hub_id is required when data.source=hub")
        if d.source not in ("stdlib",):
            for s in SPLITS:
                need(getattr(d, f"{s}_file"), f"data.{s}_file is required when data.source={d.source}")
        need(d.seq_len > 1, "data.seq_len must be > 1")
        # Hub and local models bring their own context length; stage 0 checks these against it.
        need(m.source != "tiny" or d.seq_len <= m.context_length, "data.seq_len must be <= model.context_length")
        need(d.max_epochs > 0, "data.max_epochs must be > 0")
        need(0 < d.stdlib_val_fraction and 0 < d.stdlib_test_fraction
             and d.stdlib_val_fraction + d.stdlib_test_fraction < 1, "data.stdlib_*_fraction must be > 0 and sum to < 1")
        need(d.heldout_overlap in HELDOUT_OVERLAP, f"data.heldout_overlap must be one of {', '.join(HELDOUT_OVERLAP)}")
        need(0 < d.near_duplicate_threshold <= 1, "data.near_duplicate_threshold must be in (0, 1]")
        for s in SPLITS:
            need(getattr(d, f"{s}_docs") >= 0 and getattr(d, f"quick_{s}_docs") >= 0, f"data.{s}_docs must be >= 0")
        for name in ("pretrain", "recovery_baseline", "recovery_monotone"):
            t = getattr(self, name)
            need(t.max_tokens > 0, f"{name}.max_tokens must be > 0")
            need(t.trainable in TRAINABLE and (name != "pretrain" or t.trainable == "all"),
                 f"{name}.trainable must be one of {', '.join(TRAINABLE)} (pretrain: all)")
            need(t.micro_batch_size > 0 and t.grad_accum_steps > 0, f"{name}.micro_batch_size and grad_accum_steps must be > 0")
            need(t.lr > 0, f"{name}.lr must be > 0")
            need(0 <= t.min_lr_fraction <= 1, f"{name}.min_lr_fraction must be in [0, 1]")
            need(0 <= t.warmup_fraction < 1, f"{name}.warmup_fraction must be in [0, 1)")
            grid = numbers(t.lr_grid)
            need(grid is not None and all(v >= 0 for v in grid or []) and len(set(grid or [])) == len(grid or [])
                 and any(v > 0 for v in grid or [1]),
                 f"{name}.lr_grid must be distinct comma-separated numbers >= 0, one of them > 0, got {t.lr_grid!r}")
            need(not grid or name != "pretrain", "pretrain.lr_grid: the recipe search is for the recoveries")
            need(t.schedule in SCHEDULES and 0 < t.cooldown_fraction < 1,
                 f"{name}.schedule must be one of {', '.join(SCHEDULES)} and cooldown_fraction in (0, 1)")
            need(not grid or 0 < t.sweep_tokens <= (1 - t.cooldown_fraction if t.schedule == "wsd" else 1) * t.max_tokens,
                 f"{name}.sweep_tokens must be > 0 and, a prefix of the full run, at most its "
                 + ("constant-rate part ((1 - cooldown_fraction) x max_tokens)" if t.schedule == "wsd" else "max_tokens")
                 + f" when {name}.lr_grid is set")
            need(t.lr_grid_extensions >= 0 and t.lr_confirm >= 1,
                 f"{name}.lr_grid_extensions must be >= 0 and lr_confirm >= 1")
            need(t.weight_decay >= 0 and t.grad_clip > 0, f"{name}.weight_decay must be >= 0 and grad_clip > 0")
            need(min(t.log_interval, t.eval_interval, t.eval_windows, t.checkpoint_every_steps,
                     t.keep_checkpoints) > 0 and t.checkpoint_every_minutes > 0,
                 f"{name}: intervals, eval_windows and keep_checkpoints must be > 0")
        need(mo.scope in SCOPES, f"monotone.scope must be one of {SCOPES}, got {mo.scope!r}")
        need(mo.activation in ACTIVATION_POLICIES, f"monotone.activation must be one of {ACTIVATION_POLICIES}, got {mo.activation!r}")
        need(mo.init_eps > 0, "monotone.init_eps must be > 0")
        need(mo.construction in CONSTRUCTIONS, f"monotone.construction must be one of {CONSTRUCTIONS}, got {mo.construction!r}")
        need(mo.init in INITS, f"monotone.init must be one of {INITS}, got {mo.init!r}")
        need(mo.construction != "signed_units" or mo.scope == "mlp_both",
             f"monotone.construction=signed_units signs whole hidden units (W1 rows with W2 columns): "
             f"it needs monotone.scope=mlp_both, got {mo.scope!r}")
        need(mo.cert_trials > 0, "monotone.cert_trials must be > 0")
        c = self.controls
        snaps = numbers(c.pretrain_snapshots)
        need(snaps is not None and all(v > 0 and v == int(v) for v in snaps or []),
             f"controls.pretrain_snapshots must be comma-separated token counts, got {c.pretrain_snapshots!r}")
        need(not snaps or m.source == "tiny", "controls.pretrain_snapshots: only the tiny model is pretrained here; "
                                              f"with model.source={m.source} set controls.pretrain_snapshots= (empty) "
                                              "and list control models in controls.revisions")
        need(not snaps or max(snaps) < self.pretrain.max_tokens,
             "controls.pretrain_snapshots must be below pretrain.max_tokens (the pretrained model is the last point)")
        need(not listed(c.revisions) or m.source != "tiny", "controls.revisions are hub revisions of model.hub_id; "
                                                             "the tiny preset's controls are controls.pretrain_snapshots")
        need(len(set(listed(c.revisions))) == len(listed(c.revisions)), "controls.revisions: each revision once")
        rungs = numbers(c.ladder)
        need(rungs is not None and all(0 < f < 1 for f in rungs) and len(set(rungs)) == len(rungs),
             f"controls.ladder must be distinct fractions in (0, 1) of recovery_monotone.max_tokens, got {c.ladder!r}")
        need(not rungs or c.unconstrained_from_init, "controls.ladder trains at unconstrained_from_init's chosen lr: "
                                                     "set controls.unconstrained_from_init=true")
        need(c.ladder_extensions >= 0 and c.check_windows > 0,
             "controls.ladder_extensions must be >= 0 and controls.check_windows > 0")
        e, a = self.eval, self.attack
        need(0 < e.stride <= e.max_len, "eval.stride must be > 0 and <= eval.max_len")
        need(e.task_limit >= 0 and e.task_batch_size > 0, "eval.task_limit must be >= 0, eval.task_batch_size > 0")

        need(m.source != "tiny" or e.max_len <= m.context_length, "eval.max_len must be <= model.context_length")
        need(e.batch_size > 0 and a.batch_size > 0, "eval.batch_size and attack.batch_size must be > 0")
        need(2 <= a.min_text_len <= a.text_len, "attack.min_text_len must be >= 2 and <= attack.text_len")
        need(m.source != "tiny" or a.text_len + a.uat_trigger_len + 1 <= m.context_length,
             "attack.text_len + attack.uat_trigger_len + 1 must fit model.context_length")
        for name in ("uat_opt_texts", "uat_eval_texts", "uat_trigger_len", "uat_restarts", "uat_max_sweeps",
                     "uat_top_k", "uat_beam", "hotflip_texts", "hotflip_max_flips", "hotflip_top_k", "hotflip_beam",
                     "gcg_texts", "gcg_steps", "gcg_search_width", "gcg_top_k"):
            need(getattr(a, name) > 0, f"attack.{name} must be > 0")
        need(a.gcg_buffer >= 0, "attack.gcg_buffer must be >= 0")
        need(a.uat_search in UAT_SEARCHES, f"attack.uat_search must be one of {', '.join(UAT_SEARCHES)}, got {a.uat_search!r}")
        need(a.uat_screen_texts == 0 or (0 < a.uat_screen_texts < a.uat_opt_texts and a.uat_screen_keep > 0),
             "attack.uat_screen_texts must be 0 (off) or below attack.uat_opt_texts, with attack.uat_screen_keep > 0")
        bad = [n for n in listed(a.text_attacks) if n not in TEXT_ATTACKS]
        need(listed(a.text_attacks) and not bad and len(set(listed(a.text_attacks))) == len(listed(a.text_attacks)),
             f"attack.text_attacks must list some of {', '.join(TEXT_ATTACKS)} (comma-separated, each once), "
             f"got {a.text_attacks!r}")
        need(a.surrogate_gradient in SURROGATE_GRADIENTS,
             f"attack.surrogate_gradient must be one of {', '.join(SURROGATE_GRADIENTS)}, got {a.surrogate_gradient!r}")
        radii = numbers(a.pgd_radii)
        need(radii is not None and all(r > 0 for r in radii),
             f"attack.pgd_radii must be positive numbers (comma-separated) or empty, got {a.pgd_radii!r}")
        need(not radii or (a.pgd_texts > 0 and a.pgd_steps > 0), "attack.pgd_texts and attack.pgd_steps must be > 0")
        need(a.success_threshold > 0 and a.success_abs_nats > 0, "attack.success_threshold and success_abs_nats must be > 0")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.seed >= 0, "seed must be >= 0")
        if problems:
            raise ConfigError("; ".join(problems))
