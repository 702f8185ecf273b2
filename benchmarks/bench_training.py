#!/usr/bin/env python
"""Training throughput: monotone vs baseline step time, and the Pythia-1.4B shape on a GPU.

    python benchmarks/bench_training.py [--steps 10] [--gpu-only] [--json out.json]

CPU (unless --gpu-only): the tiny preset's model, batch 16 x 128, one optimizer step =
forward + backward + clip + AdamW (+ the projection for `projected`); prints
ms/step and tokens/s of the baseline and of the monotone copy under each
construction (monotone.construction), and each one's ratio to the baseline.
GPU (when CUDA is present): a Pythia-1.4B-shaped GPT-NeoX with random weights
(no download), training's own optimizer step at the pythia-1.4b preset's sequence,
micro-batch and accumulation, fp32 master weights with bf16 autocast, with (the
preset's) and without gradient checkpointing, the baseline and the preset's
construction (--gpu-arms): tokens/s, MFU, peak memory, and the hours the preset's
recovery budget would take at that speed.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

import utils  # noqa: E402,F401
from configs.presets import load_config  # noqa: E402
from utils.model.modeling import build_tiny_model  # noqa: E402
from configs.experiment_config import CONSTRUCTIONS  # noqa: E402
from utils.model.monotonicity import apply_monotonicity  # noqa: E402
from utils.run.compute import Compute  # noqa: E402
from utils.run.time_limits import parameters, peak_bf16  # noqa: E402
from utils.train.memory import model_config  # noqa: E402
from utils.train.training import make_optimizer, optimizer_step  # noqa: E402

ARMS = ("baseline", *CONSTRUCTIONS)   # the unconstrained model, then the monotone one per construction


def time_steps(model, micro_batches: int, batch_size: int, seq_len: int, steps: int, compute: Compute,
               cfg_train) -> float:
    """Seconds per optimizer step (median of `steps` after 2 warm-up steps): training's own
    `optimizer_step` over `micro_batches` micro-batches of `batch_size` windows (forward + backward each,
    then clip + AdamW + the projection)."""
    device = compute.device
    model.to(device).train()
    opt = make_optimizer(model, cfg_train, device)
    vocab = model.config.vocab_size
    times = []
    for i in range(steps + 2):
        micro = [torch.randint(0, vocab, (batch_size, seq_len + 1), device=device) for _ in range(micro_batches)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer_step(model, opt, micro, cfg_train, compute, sharded=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def cpu_benchmark(steps: int) -> dict:
    cfg = load_config("tiny")
    bs, seq = cfg.recovery_monotone.micro_batch_size, cfg.data.seq_len
    cpu = Compute(torch.device("cpu"), "fp32")
    out = {"device": "cpu", "threads": torch.get_num_threads(), "batch": [bs, seq]}
    for arm in ARMS:
        model = build_tiny_model(cfg.model, 0)
        if arm != "baseline":
            apply_monotonicity(model, "mlp_both", "monotone", 1e-6, arm)
        s = time_steps(model, 1, bs, seq, steps, cpu, cfg.recovery_monotone)
        out[arm] = {"ms_per_step": 1e3 * s, "tokens_per_s": bs * seq / s}
    out["step_time_ratio_over_baseline"] = {c: out[c]["ms_per_step"] / out["baseline"]["ms_per_step"]
                                            for c in CONSTRUCTIONS}
    return out


def pythia_flops_per_token(c: GPTNeoXConfig, n_params: int, seq: int) -> float:
    """6N for the matmuls of forward + backward, plus attention scores 12 * L * d * T."""
    return 6 * n_params + 12 * c.num_hidden_layers * c.hidden_size * seq


def gpu_benchmark(steps: int, micro_batch: int, arms: list[str], preset_name: str = "pythia-1.4b",
                  device: str = "cuda") -> dict:
    """The pythia-1.4b preset's recovery step on a Pythia-1.4B-shaped model with random weights: its
    micro-batch and accumulation, bf16-mixed, with gradient checkpointing (the preset's) and without.
    (preset_name and device let a CPU test run the same code at the tiny preset.)"""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_bf16(name)
    preset = load_config(preset_name)
    seq = preset.data.seq_len
    out = {"device": name, "peak_bf16_flops": peak, "seq_len": seq, "micro_batch": micro_batch, "runs": []}
    for arm in arms:
        recipe = preset.recovery_baseline if arm == "baseline" else preset.recovery_monotone
        for ckpt in (True, False):
            torch.manual_seed(0)
            c = model_config(preset)    # a fresh config: apply_monotonicity changes the model's hidden_act
            with dev:                   # initialise on the GPU: 1.4B random weights on the CPU take minutes
                model = GPTNeoXForCausalLM(c)
            # The input embedding is a lookup, not a matmul: 6N counts the other parameters.
            n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
            if arm != "baseline":
                m = preset.monotone
                apply_monotonicity(model, m.scope, m.activation, m.init_eps, arm, m.init)
            if ckpt:
                model.gradient_checkpointing_enable()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            run = {"arm": arm, "gradient_checkpointing": ckpt, "grad_accum_steps": recipe.grad_accum_steps}
            try:
                s = time_steps(model, recipe.grad_accum_steps, micro_batch, seq, steps, Compute(dev, "bf16-mixed"),
                               recipe)
            except torch.cuda.OutOfMemoryError:
                out["runs"].append({**run, "oom": True})
                del model
                torch.cuda.empty_cache()
                continue
            tok_s = recipe.grad_accum_steps * micro_batch * seq / s
            flops = pythia_flops_per_token(c, n_params, seq)
            budget = recipe.max_tokens
            out["runs"].append({
                **run, "ms_per_step": 1e3 * s, "tokens_per_s": tok_s,
                # Gradient checkpointing recomputes the forward: MFU counts only useful FLOPs.
                "mfu": tok_s * flops / peak if peak else None,
                # FLOP/s as the SLURM time limits count them (utils/run/time_limits.py: 8N per token with
                # checkpointing, 6N without): the figure MONO_SLURM_TFLOPS takes.
                "counted_tflops": tok_s * (8 if ckpt else 6) * parameters(preset) / 1e12,
                # The peak over whole steps: every micro-step's activations, gradients and AdamW's moments.
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "hours_for_preset_budget": budget / tok_s / 3600, "preset_budget_tokens": budget})
            del model
            if cuda:
                torch.cuda.empty_cache()
    return out


def print_cpu(c: dict) -> None:
    print(f"CPU ({c['threads']} threads), tiny preset model, batch {c['batch'][0]} x {c['batch'][1]}:")
    for arm in ARMS:
        ratio = f"  x{c['step_time_ratio_over_baseline'][arm]:.3f} of the baseline" if arm != "baseline" else ""
        print(f"  {arm:<12} {c[arm]['ms_per_step']:8.1f} ms/step  {c[arm]['tokens_per_s']:10,.0f} tokens/s{ratio}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--gpu-micro-batch", type=int, default=load_config("pythia-1.4b").recovery_monotone.micro_batch_size,
                   help="default %(default)s: the pythia-1.4b preset's micro-batch")
    p.add_argument("--gpu-arms", default=f"baseline,{load_config('pythia-1.4b').monotone.construction}",
                   help="GPU: the arms timed (baseline and constructions; default %(default)s: the preset's)")
    p.add_argument("--gpu-only", action="store_true", help="skip the CPU half (on a GPU machine)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    res = {}
    if not args.gpu_only:
        print_cpu(res.setdefault("cpu", cpu_benchmark(args.steps)))
    if torch.cuda.is_available():
        g = res["gpu"] = gpu_benchmark(args.steps, args.gpu_micro_batch, args.gpu_arms.split(","))
        print(f"GPU {g['device']}: Pythia-1.4B shape, random weights, seq {g['seq_len']}, micro-batch "
              f"{g['micro_batch']} x {g['runs'][0]['grad_accum_steps']} per step, fp32 master + bf16 autocast:")
        for r in g["runs"]:
            tag = f"  {r['arm']:<12} grad-ckpt={'on ' if r['gradient_checkpointing'] else 'off'}"
            if r.get("oom"):
                print(f"{tag}  out of memory")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{tag}  {r['tokens_per_s']:9,.0f} tokens/s  MFU {mfu}  counted {r['counted_tflops']:.0f} TFLOP/s  "
                  f"peak {r['peak_memory_gib']:.1f} GiB  "
                  f"preset budget ({r['preset_budget_tokens'] / 1e9:.2f}B tokens): {r['hours_for_preset_budget']:.1f} h")
    else:
        print("GPU: no CUDA device here; the Pythia-1.4B figures need one.")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
