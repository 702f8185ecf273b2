"""SLURM time limits of stages 2-6 from the work the config asks for and a stated throughput.

Work is counted in FLOPs from the config alone (it runs before stage 0 exists): N is the
model's parameter count (Pythia's published shapes by hub id; the tiny preset's from its
fields), a forward pass costs 2N per token, training 6N (8N with gradient checkpointing,
which recomputes the forward), an embedding-gradient pass of an attack is counted as 6N.
It imports no torch (run_all.sh calls it before submitting). Every bound is an upper bound of what the stage's loops can do (every sweep, step and
beam item run in full). Throughput: the reference GPU's dense bf16 peak times an assumed
utilisation (MFU), or a CPU figure; the limit is MARGIN x the estimate plus a fixed start
and save overhead, rounded up to 15 minutes, at least 30 minutes. Stages that checkpoint
and requeue (2-6: training checkpoints, measurement keeps each arm it finished) are capped at MAX_HOURS or the
cluster's own limit if shorter (the partition's MaxTime, the QOS's MaxWall: `cluster_max_hours`); a longer
estimate means several requeued runs, which the limit line says. The other stages' fixed limits are capped
too. A stage whose smallest unit of requeued work (a training step, one arm's measurement in stage 4, a UAT
restart, an attacked text) cannot fit a job
is refused (`LimitError`) before anything is submitted. Measured throughput (benchmarks/gpu_check.sh)
replaces the assumed one with MONO_SLURM_TFLOPS.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from configs.experiment_config import AttackConfig, ExperimentConfig, listed, numbers
from utils.run.pilot_grid import PILOT_TEXTS, pilot_runs

# (layers, d_model, heads) of the released Pythia models; vocabulary 50,304 rows, MLP 4 x d.
PYTHIA_SHAPES = {"pythia-70m": (6, 512, 8), "pythia-160m": (12, 768, 12), "pythia-410m": (24, 1024, 16),
                 "pythia-1b": (16, 2048, 8), "pythia-1.4b": (24, 2048, 16), "pythia-2.8b": (32, 2560, 32),
                 "pythia-6.9b": (32, 4096, 32), "pythia-12b": (36, 5120, 40)}
PYTHIA_VOCAB = 50_304
REFERENCE_GPU = ("A100", 312e12)      # dense bf16 peak FLOP/s (datasheet)
PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L40S": 362e12, "A10": 125e12}   # by device name


def peak_bf16(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a device by its name (torch.cuda.get_device_name()), None if unknown."""
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)
MFU = {"train": 0.35, "measure": 0.25}   # assumed: batches of 8-32 short sequences use the GPU worse
CPU_FLOPS = 5e10                      # assumed for a CPU job (the tiny model trains at ~1e11 on 2 cores)
DOC_TOKENS = 1_600                    # assumed mean tokens of a test document (a Pile document is ~1-2k)
TASK_REQUESTS, REQUEST_TOKENS = 10_000, 128   # assumed per lm-eval task (HellaSwag: 40,168 requests; SciQ: 4,000)
MARGIN, OVERHEAD_H, MIN_H, MAX_HOURS = 2.0, 0.25, 0.5, 24.0
REQUEUED = (2, 3, 4, 5, 6)
# Limits of the stages whose work is not counted (0: corpus, tokenizer, downloads or the tiny pretraining; 1: the
# constraint and its certificate; 7, 8: tables), and of 2-6 when the model's size is unknown before stage 0.
FIXED_HOURS = {0: 1.0, 1: 0.5, 2: 24.0, 3: 24.0, 4: 8.0, 5: 24.0, 6: 8.0, 7: 0.5, 8: 0.5, 9: 8.0}
PILOT = 9                     # the attack pilot's job (run_all.sh --pilot): one job, not requeued


class LimitError(ValueError):
    """A stage cannot finish within the cluster's limit, even in requeued pieces."""


def slurm_hours(text: str) -> float | None:
    """A SLURM time (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in hours; None for UNLIMITED/INFINITE."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise LimitError(f"not a SLURM time: {text!r} (expected e.g. 24:00:00, 1-00:00:00 or minutes)")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:                                   # D-HH[:MM[:SS]]
        return days * 24 + a + (b or 0) / 60 + (c or 0) / 3600
    if c is not None:                                      # HH:MM:SS
        return a + b / 60 + c / 3600
    if b is not None:                                      # MM:SS
        return a / 60 + b / 3600
    return a / 60                                          # MINUTES


def cluster_max_hours(partition: str = "", qos: str = "") -> tuple[float | None, str]:
    """(hours, where from) of the longest job this cluster allows: MONO_SLURM_MAX_TIME if set, else the
    partition's MaxTime (`scontrol`; the default partition if none is named) and the QOS's MaxWall (`sacctmgr`,
    where accounting runs), the shorter; (None, why) when neither is known."""
    stated = os.environ.get("MONO_SLURM_MAX_TIME", "")
    if stated:
        return slurm_hours(stated), f"MONO_SLURM_MAX_TIME={stated}"
    def ask(*cmd) -> str:                       # a command's output; "" where it is missing, fails or hangs
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30) if shutil.which(cmd[0]) else None
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return r.stdout if r is not None and r.returncode == 0 else ""

    found = []
    names = [p for p in partition.split(",") if p]        # a job may go to any partition listed: the shortest
    for line in ask("scontrol", "-o", "show", "partition").splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("PartitionName") in names or (not names and fields.get("Default") == "YES"):
            found.append((slurm_hours(fields.get("MaxTime", "")),
                          f"partition {fields['PartitionName']} MaxTime={fields.get('MaxTime')}"))
    if qos and (wall := ask("sacctmgr", "-nP", "show", "qos", qos, "format=MaxWall").strip()):
        found.append((slurm_hours(wall.splitlines()[0]), f"QOS {qos} MaxWall={wall.split()[0]}"))
    limited = [(h, src) for h, src in found if h is not None]
    if limited:
        return min(limited)
    return None, ("; ".join(src for _, src in found) or "no scontrol here and MONO_SLURM_MAX_TIME unset") + \
        ": no cluster limit known"


@dataclass
class Limit:
    stage: int
    flops: float
    hours: float          # the estimate, before the margin
    limit_h: float        # what the job asks for
    work: str             # what was counted
    unit_h: float = 0.0   # the smallest piece a requeued run must finish to progress (a step; one arm measured)

    @property
    def slurm(self) -> str:
        return hms(self.limit_h)


def shape(cfg: ExperimentConfig) -> tuple[int, int, int, int] | None:
    """(layers, d_model, d_ff, vocabulary) from the config (None: a hub or local model of unknown shape)."""
    m = cfg.model
    if m.source == "tiny":
        return m.n_layer, m.d_model, m.d_ff, m.vocab_size
    known = PYTHIA_SHAPES.get((m.hub_id or m.path).rstrip("/").split("/")[-1].lower())
    return None if known is None else (known[0], known[1], 4 * known[1], PYTHIA_VOCAB)


def parameters(cfg: ExperimentConfig) -> int | None:
    """The model's parameter count from the config (None: a hub or local model of unknown shape)."""
    if (s := shape(cfg)) is None:
        return None
    layers, d, ff, vocab = s
    return layers * (4 * d * d + 2 * d * ff) + 2 * vocab * d


def measured_arms(cfg: ExperimentConfig) -> int:
    """Arms stages 4-6 measure: pretrained, controls, baseline, monotonic, monotonic_init (+ its controls of the
    same history: unconstrained_from_init and the ladder's configured rungs)."""
    controls = len(listed(cfg.controls.pretrain_snapshots if cfg.model.source == "tiny" else cfg.controls.revisions))
    return 4 + controls + int(cfg.controls.unconstrained_from_init) + len(cfg.ladder_tokens())


def training_flops(cfg: ExperimentConfig, arm: str, n: int) -> tuple[float, float]:
    """(FLOPs, tokens) of one recovery arm (or ladder_<tokens>: a rung, no recipe search): its recipe search (every
    trained value's prefix and cooldown, not the grid's extensions), the rest of its full run (it goes on from the
    chosen value's prefix; lr_confirm values' full runs), and their validation forwards."""
    t = cfg.recovery_baseline if arm == "baseline" else cfg.recovery_monotone
    if arm.startswith("ladder_"):
        t = dataclasses.replace(t, max_tokens=int(arm.removeprefix("ladder_")), lr_grid="")
    seq = cfg.data.seq_len
    per_token = (8 if t.gradient_checkpointing else 6) * n
    per_step = t.micro_batch_size * t.grad_accum_steps * seq
    total = max(1, math.ceil(t.max_tokens / per_step))          # whole optimizer steps, as training.budget_tokens
    trained = [v for v in numbers(t.lr_grid) or [] if v > 0]    # lr 0 is the start model: one evaluation
    prefix = max(1, round(t.sweep_tokens / per_step)) if trained else 0
    confirmed = min(t.lr_confirm, len(trained)) if trained else 1     # the best go on to the full budget
    runs = [prefix + max(1, round(t.cooldown_fraction * prefix))] * len(trained) + [total - prefix] * confirmed
    steps = sum(runs)
    evals = steps // t.eval_interval + 2 * len(runs) + len(numbers(t.lr_grid) or [])
    return per_token * steps * per_step + 2 * n * evals * t.eval_windows * seq, float(steps * per_step)


# UAT's beam search ends a restart after a sweep without gain: on tiny, all 24 restarts (cap 10) stopped by
# sweep 5 (docs/measurement.md). Stage 5's job is counted at this many sweeps per restart (its requeued runs go on
# past it); its ceiling, attack.uat_max_sweeps, bounds one restart (the piece that must fit in one job) and is
# stated beside it. The pilot of the Pythia budgets (issue 36) is what measures it at scale.
UAT_COUNTED_SWEEPS = 6


def search_passes(a: AttackConfig, name: str) -> tuple[int, int]:
    """(forward, gradient) sequence passes one text's search can spend (stage 6's searches, each in full)."""
    if name == "hotflip":
        return 2 + a.hotflip_max_flips * a.hotflip_beam * a.hotflip_top_k + 2, a.hotflip_max_flips * a.hotflip_beam
    if name == "random_search":     # no gradient; its gradient-fidelity check: one gradient, width + 1 forwards
        return 2 + a.gcg_steps * a.gcg_search_width + a.gcg_search_width + 1, 1
    return 2 + a.gcg_steps * a.gcg_search_width, a.gcg_steps      # gcg, gcg_surrogate


def uat_passes(a: AttackConfig, uat_sweeps: int | None = None) -> tuple[float, float]:
    """(forward, gradient) text passes of one arm's trigger search: every restart, at `uat_sweeps` sweeps (default
    its ceiling, attack.uat_max_sweeps), and the clean optimisation-set loss."""
    def scored(candidates):      # text forwards to score candidate triggers (uat.trigger_losses, screened or not)
        if a.uat_screen_texts and candidates > a.uat_screen_keep:
            return candidates * a.uat_screen_texts + a.uat_screen_keep * (a.uat_opt_texts - a.uat_screen_texts)
        return candidates * a.uat_opt_texts

    if a.uat_search == "beam":
        rounds, grads = min(uat_sweeps or a.uat_max_sweeps, a.uat_max_sweeps) * a.uat_trigger_len, a.uat_beam
        fwd = a.uat_restarts * (a.uat_opt_texts + rounds * scored(a.uat_beam * a.uat_top_k))
    else:
        rounds, grads = a.gcg_steps, 1
        fwd = a.uat_restarts * (a.uat_opt_texts + rounds * scored(a.gcg_search_width))
    return fwd + a.uat_opt_texts, a.uat_restarts * rounds * grads * a.uat_opt_texts


def attack_forward_equivalents(cfg: ExperimentConfig, arms: int, uat_sweeps: int | None = None) -> tuple[float, float]:
    """(forward tokens, gradient tokens) stages 5 and 6 can spend on every arm together, UAT's restarts at
    `uat_sweeps` sweeps (default its ceiling, attack.uat_max_sweeps: every bound here is then an upper bound)."""
    a = cfg.attack
    uat_len, text_len = 1 + a.uat_trigger_len + a.text_len, 1 + a.text_len
    fwd, grad = uat_passes(a, uat_sweeps)
    held_out = arms * (arms + 1 + a.uat_restarts) * a.uat_eval_texts      # every trigger and every restart's
    uat = (arms * fwd * uat_len + held_out * uat_len, arms * grad * uat_len)
    fwd = grad = 0.0
    for name in listed(a.text_attacks):
        per_text = search_passes(a, name)
        texts = a.hotflip_texts if name == "hotflip" else a.gcg_texts
        fwd += arms * texts * (per_text[0] + 2 * arms) * text_len      # the search, then every record on every model
        grad += arms * texts * per_text[1] * text_len
    fwd += 2 * arms * a.gcg_texts * text_len                           # the worst case's flat-region passes
    radii = len(numbers(a.pgd_radii) or [])
    fwd += arms * a.pgd_texts * radii * 2 * text_len                    # PGD: clean and final rescoring
    grad += arms * a.pgd_texts * radii * (a.pgd_steps + 1) * text_len
    return uat, (fwd, grad)


def pilot_arms(cfg: ExperimentConfig) -> int:
    """The attack pilot's arms: pretrained, monotonic_init and the first control, where stage 0 measures one."""
    controls = listed(cfg.controls.pretrain_snapshots if cfg.model.source == "tiny" else cfg.controls.revisions)
    return 2 + min(1, len(controls))


def pilot_forward_equivalents(cfg: ExperimentConfig, texts: int) -> tuple[float, float]:
    """(forward tokens, gradient tokens) of the attack pilot (scripts/attack_pilot.py) on `texts` texts per arm:
    every run of its grid (utils/run/pilot_grid.py) in full, UAT's restarts at UAT_COUNTED_SWEEPS sweeps."""
    a = cfg.attack
    runs, text_len, uat_len, fwd, grad = pilot_runs(a), 1 + a.text_len, 1 + a.uat_trigger_len + a.text_len, 0.0, 0.0
    for name, configs in (("gcg", runs["gcg"]), ("hotflip", runs["hotflip"] + runs["flips"])):
        for c in configs:
            f, g = search_passes(c, name)
            fwd, grad = fwd + texts * f * text_len, grad + texts * g * text_len
    if runs["uat"] is not None:
        f, g = uat_passes(runs["uat"], UAT_COUNTED_SWEEPS)
        fwd, grad = fwd + f * uat_len, grad + g * uat_len
    arms = pilot_arms(cfg)
    return arms * fwd, arms * grad


def stage_limits(cfg: ExperimentConfig, gpu: bool, train_procs: int = 1, measure_procs: int = 1,
                 cap_hours: float = MAX_HOURS, pilot_texts: int = PILOT_TEXTS) -> list[Limit] | None:
    """The limits of stages 2-6 for jobs with (gpu) or without a GPU, training on `train_procs` processes
    and measuring on `measure_procs` (each its share of the work), none over `cap_hours`, or None if the
    model's size is unknown before stage 0."""
    n = parameters(cfg)
    if n is None:
        return None
    tflops = os.environ.get("MONO_SLURM_TFLOPS")
    peak = float(tflops) * 1e12 if tflops else REFERENCE_GPU[1] if gpu else CPU_FLOPS

    def rate(kind):
        procs = train_procs if kind == "train" else measure_procs
        return procs * peak * (MFU[kind] if gpu and not tflops else 1.0)

    out = []
    ladder = [f"ladder_{t}" for t in cfg.ladder_tokens()]
    for stage, arms in ((2, ["baseline"]), (3, ["monotonic"] + (["unconstrained_from_init"]
                                                                  if cfg.controls.unconstrained_from_init else []) + ladder)):
        parts = [training_flops(cfg, arm, n) for arm in arms]
        flops = sum(f for f, _ in parts)
        rungs = [t for a, (_, t) in zip(arms, parts) if a.startswith("ladder_")]
        t = cfg.recovery_baseline if stage == 2 else cfg.recovery_monotone
        step = (8 if t.gradient_checkpointing else 6) * n * t.micro_batch_size * t.grad_accum_steps * cfg.data.seq_len
        out.append(_limit(stage, flops, flops / rate("train"),
                          f"{len(arms) - len(rungs)} arm(s)" + (f" and {len(rungs)} ladder rung(s)" if rungs else "")
                          + f", {sum(t for _, t in parts) / 1e9:.3g}B training tokens"
                          + (f" ({sum(rungs) / 1e9:.3g}B of them the ladder's)" if rungs else ""),
                          step / rate("train"), cap_hours))
    arms = measured_arms(cfg)
    e = cfg.eval
    test_tokens = (cfg.data.max_docs("test") or 1_000) * DOC_TOKENS
    eval_tokens = arms * test_tokens * e.max_len / e.stride
    task_tokens = arms * len(listed(e.tasks)) * (4 * e.task_limit or TASK_REQUESTS) * REQUEST_TOKENS
    flops = 2 * n * (eval_tokens + task_tokens)
    out.append(_limit(4, flops, flops / rate("measure"),
                      f"{arms} arms: perplexity over ~{test_tokens / 1e6:.2g}M test tokens (stride {e.stride}) "
                      f"and {len(listed(e.tasks))} lm-eval task(s)", flops / rate("measure") / arms, cap_hours))
    # Stage 5 keeps each UAT restart, stage 6 each attacked text: a requeued run's smallest piece (stage 6's
    # counted here as its whole work over its fewest texts per search: more than any one text of any search; a
    # text is one process's, where UAT's restart shares its queries across all).
    a = cfg.attack
    texts = min([a.hotflip_texts if s == "hotflip" else a.gcg_texts for s in listed(a.text_attacks)] or [1])
    ceiling = attack_forward_equivalents(cfg, arms)
    counted = attack_forward_equivalents(cfg, arms, UAT_COUNTED_SWEEPS)
    for stage, (fwd, grad), (top, top_grad), pieces in zip((5, 6), counted, ceiling, (a.uat_restarts, texts)):
        flops, most = 2 * n * fwd + 6 * n * grad, 2 * n * top + 6 * n * top_grad
        work = f"{arms} arms: {fwd / 1e6:.3g}M forward and {grad / 1e6:.3g}M gradient tokens"
        if stage == 5 and a.uat_search == "beam" and most > flops:
            work += (f" (restarts counted at {UAT_COUNTED_SWEEPS} sweeps; every restart at the ceiling of "
                     f"{a.uat_max_sweeps}: {most / rate('measure') / 3600:.3g} h)")
        else:
            work += " at most"
        out.append(_limit(stage, flops, flops / rate("measure"), work,
                          most / rate("measure") / arms / max(1, pieces) * (measure_procs if stage == 6 else 1),
                          cap_hours))
    fwd, grad = pilot_forward_equivalents(cfg, pilot_texts)
    flops = 2 * n * fwd + 6 * n * grad
    out.append(_limit(PILOT, flops, flops / rate("measure"),
                      f"{pilot_arms(cfg)} arms x {pilot_texts} texts, every budget of its grid: {fwd / 1e6:.3g}M forward "
                      f"and {grad / 1e6:.3g}M gradient tokens", flops / rate("measure"), cap_hours))
    return out


def _limit(stage: int, flops: float, seconds: float, work: str, unit_seconds: float, cap_hours: float) -> Limit:
    hours = seconds / 3600
    limit = min(max(MIN_H, math.ceil((MARGIN * hours + OVERHEAD_H) * 4) / 4), cap_hours)
    return Limit(stage, flops, hours, limit, work, unit_seconds / 3600)


def hms(hours: float) -> str:
    minutes = int(hours * 60 + 1e-6)          # down: a limit cut to the cluster's never rounds past it
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def job_limits(cfg: ExperimentConfig, gpu: bool, train_procs: int = 1, measure_procs: int = 1,
               max_hours: float | None = None, lead_s: float = 120,
               stated: dict[int, float] | None = None, pilot_texts: int = PILOT_TEXTS) -> tuple[dict[int, float], list[Limit]]:
    """({stage: hours} of every job 0-8, derived for 2-6 where the model's size is known, else fixed; none over
    the cluster's `max_hours`), and the derived limits. LimitError where a requeued stage's smallest unit of
    work (MARGIN x one training step, one arm's stage 4, a UAT restart, an attacked text) cannot fit in a job
    before its stop signal,
    `lead_s` seconds before the limit (run_all.sh's --signal). `stated`: stages whose limit the user set
    (MONO_SLURM_TIME_<N>, which run_all.sh passes as it is): their pieces are checked against it."""
    cap = min(MAX_HOURS, max_hours) if max_hours else MAX_HOURS
    derived = stage_limits(cfg, gpu, train_procs, measure_procs, cap, pilot_texts) or []
    hours = {n: min(h, max_hours) if max_hours else h for n, h in FIXED_HOURS.items()}
    hours.update({lim.stage: lim.limit_h for lim in derived})
    for n, h in (stated or {}).items():
        if max_hours and h > max_hours:
            raise LimitError(f"MONO_SLURM_TIME_{n}={hms(h)} asks for more than the cluster allows ({hms(max_hours)})")
    room = cap - lead_s / 3600                   # what a job asks for, less the warning's lead
    if room <= 0:
        raise LimitError(f"the stop signal {lead_s:.0f} s before the limit (MONO_SLURM_SIGNAL_LEAD) leaves no "
                         f"time in a job of {hms(cap)}")
    for lim in (x for x in derived if x.stage in REQUEUED):
        if MARGIN * lim.unit_h > (stated or {}).get(lim.stage, cap) - lead_s / 3600:
            piece = {2: "one training step", 3: "one training step", 4: "one arm's measurement",
                     5: "one UAT restart on one arm", 6: "one attacked text"}[lim.stage]
            procs = "MONO_SLURM_GPUS_PER_NODE" if lim.stage in (2, 3) else "MONO_SLURM_MEASURE_PROCS"
            longer = "a partition with a longer MaxTime, " if max_hours and max_hours < MAX_HOURS else ""
            raise LimitError(f"stage {lim.stage} cannot finish in requeued jobs of {hms(cap)}: {piece} is counted at "
                             f"~{lim.unit_h:.2f} h ({MARGIN:g}x that must fit before the stop signal); use "
                             f"{longer}more processes ({procs}) or a smaller budget")
    return hours, derived


def describe_cap(max_hours: float | None, source: str) -> str:
    """The line --dry-run prints about the cluster's own limit."""
    if max_hours is None:
        return f"cluster limit: {source}; jobs of stages 2-6 ask for at most {hms(MAX_HOURS)}"
    fixed = ", ".join(f"{n}" for n, h in FIXED_HOURS.items() if n not in REQUEUED and h > max_hours)
    return (f"cluster limit: {source} ({hms(max_hours)}): no job asks for more; stages 2-6 requeue past it"
            + (f"; the fixed limits of stages {fixed} (not requeued) are cut to it" if fixed else ""))


def describe(cfg: ExperimentConfig, limits: list[Limit], gpu: bool, train_procs: int = 1,
             measure_procs: int = 1) -> list[str]:
    tflops = os.environ.get("MONO_SLURM_TFLOPS")
    rate = (f"MONO_SLURM_TFLOPS={tflops} (measured)" if tflops else
            f"{REFERENCE_GPU[0]} bf16 peak {REFERENCE_GPU[1] / 1e12:.0f} TFLOP/s at an assumed MFU of "
            f"{MFU['train']:.0%} (training) / {MFU['measure']:.0%} (measurement)" if gpu else
            f"a CPU at an assumed {CPU_FLOPS / 1e9:.0f} GFLOP/s")
    lines = [f"time limits of stages 2-6 (N = {parameters(cfg) / 1e6:,.1f}M parameters; {rate}, per process; "
             f"{train_procs} training and {measure_procs} measuring process(es); limit = "
             f"{MARGIN:g} x estimate + {OVERHEAD_H * 60:.0f} min, >= {MIN_H * 60:.0f} min; utils/run/time_limits.py):"]
    unit = "CPU" if not gpu else "GPU" if tflops else REFERENCE_GPU[0]
    for lim in (x for x in limits if x.stage in REQUEUED):
        runs = math.ceil(MARGIN * lim.hours / lim.limit_h)
        note = f", about {runs} requeued runs" if runs > 1 else ""
        lines.append(f"  stage {lim.stage}: {lim.work}: {lim.flops:.2e} FLOP, ~{lim.hours:.2f} h -> {lim.slurm}{note}")
    procs = {2: train_procs, 3: train_procs, 4: measure_procs, 5: measure_procs, 6: measure_procs}
    wall = sum(lim.hours for lim in limits if lim.stage in REQUEUED)
    used = sum(lim.hours * procs[lim.stage] for lim in limits if lim.stage in REQUEUED)
    lines.append(f"  stages 2-6 together: ~{used:.1f} {unit}-hours per seed" + (
        f" (~{wall:.1f} h of wall time)" if used > wall else "") + " (the estimates, before the margin)")
    for lim in (x for x in limits if x.stage == PILOT):
        short = MARGIN * lim.hours + OVERHEAD_H > lim.limit_h + 1e-9
        lines.append(f"  the attack pilot (run_all.sh --pilot; scripts/attack_pilot.py, once, before stage 2): {lim.work}: "
                     f"{lim.flops:.2e} FLOP, ~{lim.hours:.2f} h on {measure_procs} process(es) -> {lim.slurm}"
                     + (" (cut to the cluster's limit, and not requeued: use more processes, MONO_SLURM_MEASURE_PROCS, "
                           "or fewer texts, --pilot-texts)"
                        if short else ""))
    rungs = cfg.ladder_tokens()
    if rungs:
        full = cfg.recovery_monotone.max_tokens
        lines.append("  ladder (controls.ladder): rungs of " + ", ".join(f"{t / 1e6:.4g}M" for t in rungs)
                     + f" tokens ({', '.join(f'1/{full / t:.3g}' for t in rungs)} of {full / 1e6:.4g}M); stage 3 adds "
                     f"up to {cfg.controls.ladder_extensions} more (half the smallest, twice the largest) to bracket the "
                     f"monotone arm: each at most {rungs[-1] * 2 / 1e6:.4g}M tokens and one more arm for stages 4-6, not "
                     f"counted above")
    return lines
