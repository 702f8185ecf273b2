"""Host memory per node and disk per seed, counted from the config before anything runs (run_all.sh --dry-run
prints them; its jobs ask for `--mem` from the memory).

Counted from what the code holds and writes, per N parameters (utils/run/time_limits.parameters), not measured
at scale:
  host memory  every process's runtime (PROCESS_GIB: Python, torch, on a GPU node the CUDA context) plus the
               largest host copy of model state the stage makes: stage 0 a control's fp32 model and its fp16
               file (6N bytes: the validation-loss check); stage 1 the fp16 file, the fp32 model and the
               monotone copy (10N); stages 2-3 rank 0's one whole fp32 model (5N: the start it fills the other
               ranks' shards from, later the trained model it gathers and exports tensor by tensor; checkpoints and
               exports are written one tensor at a time, utils/run/streamed_safetensors.py; benchmarks/host_memory.py
               measured at most 4.6N of growth in any phase at pythia-160m's shape), and on CPU processes the
               training state (16N over the W ranks); stages 4-6 a whole fp32 arm per process on a CPU (4N), on a GPU, where
               the weights go from the file straight to the device, N (assumed: the load's transient buffers
               and file pages); stage 7 none.
  disk         per seed, when every stage has finished: per trained arm (baseline, monotonic,
               unconstrained_from_init, each ladder rung) its model and best-weights export (4N each), the last
               checkpoint it keeps (12N: fp32 weights and Adam's two moments) and best/ (4N); monotonic_init's
               model (4N); the peak while training adds the arm in progress's second kept checkpoint and the
               recipe search's prefixes (12N each, until the choice). Shared by every seed: the training token
               file (2 bytes a token) and the pretrained model (fp16 in the hub cache, 2N).
"""
from __future__ import annotations

import math

from configs.experiment_config import ExperimentConfig, numbers
from utils.run.time_limits import parameters, shape

GIB = 2 ** 30
PROCESS_GIB = {"gpu": 4.0, "cpu": 1.5}     # assumed runtime of one process, beside the model state it holds
MEM_MARGIN, MEM_FLOOR_GIB = 1.5, 16        # --mem = margin x the count, rounded up to 8 GiB, at least the floor
ARM_BYTES = 4 + 4 + 12 + 4                 # per parameter, a finished arm: model, best export, last checkpoint, best/


def host_memory_gib(cfg: ExperimentConfig, stage: int, gpu: bool, procs: int = 1, world: int = 1) -> float | None:
    """Host memory one node of `stage`'s job holds at its peak, with `procs` processes on it of `world` in all;
    None where the model's size is unknown before stage 0."""
    n = parameters(cfg)
    if n is None:
        return None
    arm = (1 if gpu else 4) * n * procs
    state = {0: 6 * n, 1: 10 * n, 4: arm, 5: arm, 6: arm, 7: 0, 8: 0, 9: arm}.get(stage)     # 9: the attack pilot
    if stage in (2, 3):
        state = 5 * n + (0 if gpu else 16 * n * procs / world)
    on_gpu = stage in (*range(1, 7), 9)
    runtime = PROCESS_GIB["gpu" if gpu and on_gpu else "cpu"] * (procs if stage in (*range(2, 7), 9) else 1)
    return state / GIB + runtime


def mem_request(gib: float | None, default: str) -> str:
    """The --mem a job asks for from its counted peak (the default where none is counted)."""
    if gib is None:
        return default
    return f"{max(MEM_FLOOR_GIB, 8 * math.ceil(MEM_MARGIN * gib / 8))}G"


def disk_per_seed_gb(cfg: ExperimentConfig) -> dict[str, float] | None:
    """{"kept": GB a finished seed keeps, "peak": GB while it trains, "shared": GB of every seed's shared/}."""
    n = parameters(cfg)
    if n is None:
        return None
    trained = ["baseline", "monotonic"] + (["unconstrained_from_init"] if cfg.controls.unconstrained_from_init
                                           else []) + [f"ladder_{t}" for t in cfg.ladder_tokens()]
    kept = len(trained) * ARM_BYTES * n + 4 * n
    searched = max(len([v for v in numbers(r.lr_grid) or [] if v > 0]) + r.lr_grid_extensions if r.lr_grid else 0
                   for r in (cfg.recovery_baseline, cfg.recovery_monotone))
    keep = max(cfg.recovery_baseline.keep_checkpoints, cfg.recovery_monotone.keep_checkpoints)
    peak = kept + (keep - 1) * 12 * n + searched * 12 * n
    tokens = max(cfg.recovery_baseline.max_tokens, cfg.recovery_monotone.max_tokens, cfg.pretrain.max_tokens)
    shared = 2 * tokens + (2 * n if cfg.model.source != "tiny" else 4 * n)
    return {"kept": kept / 1e9, "peak": peak / 1e9, "shared": shared / 1e9}


def describe(cfg: ExperimentConfig, mems: dict[int, float | None], requests: dict[int, str]) -> list[str]:
    """--dry-run's lines: each job's counted host memory and --mem, and the disk per seed."""
    if parameters(cfg) is None:
        return ["host memory and disk: the model's size is unknown before stage 0; --mem keeps its defaults"]
    lines = ["host memory per node (counted: utils/run/resources.py; --mem = "
             f"{MEM_MARGIN:g} x, rounded up to 8 GiB, >= {MEM_FLOOR_GIB} GiB; MONO_SLURM_MEM/_CPU_MEM win): "
             + ", ".join(f"stage {s} ~{g:.1f} GiB -> {requests[s]}" for s, g in mems.items() if g is not None)]
    n = parameters(cfg)
    layers, d, ff, _ = shape(cfg)
    mlp = layers * {"mlp_in": d * ff, "mlp_both": 2 * d * ff, "mlp_in_attn_out": d * ff + d * d}[cfg.monotone.scope]
    lines.append(f"GPU memory (MONO_SLURM_GPU=gpu:<type>:1 names the card): stages 1 and 4-6 hold a whole fp32 arm, "
                 f"~{4 * n / 1e9:.3g} GB, plus activations; a monotone arm's constrained weights (~{4 * mlp / 1e9:.3g} "
                 f"GB) are kept across forwards only where twice that is free, else computed layer by layer; "
                 f"training holds ~{16 * n / 1e9:.3g} GB of state over its ranks plus activations "
                 f"(benchmarks/estimate_memory.py)")
    disk = disk_per_seed_gb(cfg)
    lines.append(f"disk: ~{disk['kept']:.3g} GB per finished seed (models, best weights, each arm's last checkpoint), "
                 f"~{disk['peak']:.3g} GB at its peak while training (the recipe search's prefixes and a second "
                 f"checkpoint), and ~{disk['shared']:.3g} GB shared by every seed (token files, the pretrained model)")
    return lines
