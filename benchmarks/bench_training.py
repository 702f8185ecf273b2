#!/usr/bin/env python
"""Training throughput: monotone vs baseline step time, and the Pythia-1.4B shape on a GPU.

    python benchmarks/bench_training.py [--steps 10] [--json out.json]

CPU (always): the tiny preset's model, batch 16 x 128, one optimizer step =
forward + backward + clip + AdamW (+ the projection for `projected`); prints
ms/step and tokens/s of the baseline and of the monotone copy under each
construction (monotone.construction), and each one's ratio to the baseline.
GPU (when CUDA is present): a Pythia-1.4B-shaped GPT-NeoX with random weights
(no download) at sequence 2048, fp32 master weights with bf16 autocast, with
and without gradient checkpointing, baseline and each construction: tokens/s, MFU, peak memory, and the hours
the pythia-1.4b preset's recovery budget would take at that speed.
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
from utils.model.monotonicity import apply_monotonicity, project_constrained_  # noqa: E402
from utils.run.compute import Compute  # noqa: E402
from utils.train.training import lm_loss, make_optimizer  # noqa: E402

# Dense bf16 peak FLOP/s by device name (datasheet values, no sparsity).
ARMS = ("baseline", *CONSTRUCTIONS)   # the unconstrained model, then the monotone one per construction
PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L40S": 362e12, "A10": 125e12}


def time_steps(model, batch_size, seq_len, steps, compute: Compute, cfg_train) -> float:
    """Seconds per optimizer step (median of `steps` after 2 warm-up steps)."""
    device = compute.device
    model.to(device).train()
    opt = make_optimizer(model, cfg_train, device)
    vocab = model.config.vocab_size
    times = []
    for i in range(steps + 2):
        batch = torch.randint(0, vocab, (batch_size, seq_len + 1), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with compute.autocast():
            loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        project_constrained_(model)
        opt.zero_grad(set_to_none=True)
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
        s = time_steps(model, bs, seq, steps, cpu, cfg.recovery_monotone)
        out[arm] = {"ms_per_step": 1e3 * s, "tokens_per_s": bs * seq / s}
    out["step_time_ratio_over_baseline"] = {c: out[c]["ms_per_step"] / out["baseline"]["ms_per_step"]
                                            for c in CONSTRUCTIONS}
    return out


def pythia_flops_per_token(c: GPTNeoXConfig, n_params: int, seq: int) -> float:
    """6N for the matmuls of forward + backward, plus attention scores 12 * L * d * T."""
    return 6 * n_params + 12 * c.num_hidden_layers * c.hidden_size * seq


def gpu_benchmark(steps: int, micro_batch: int) -> dict:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    preset = load_config("pythia-1.4b")
    c = GPTNeoXConfig(vocab_size=50304, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=8192, hidden_act="gelu", max_position_embeddings=2048,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                      use_parallel_residual=True, tie_word_embeddings=False)
    out = {"device": name, "peak_bf16_flops": peak, "seq_len": 2048, "micro_batch": micro_batch, "runs": []}
    for arm in ARMS:
        for ckpt in (False, True):
            torch.manual_seed(0)
            with dev:                   # initialise on the GPU: 1.4B random weights on the CPU take minutes
                model = GPTNeoXForCausalLM(c)
            n_params = sum(p.numel() for p in model.parameters())
            if arm != "baseline":
                apply_monotonicity(model, "mlp_both", "monotone", 1e-6, arm)
            if ckpt:
                model.gradient_checkpointing_enable()
            torch.cuda.reset_peak_memory_stats()
            try:
                s = time_steps(model, micro_batch, 2048, steps, Compute(dev, "bf16-mixed"), preset.recovery_monotone)
            except torch.cuda.OutOfMemoryError:
                out["runs"].append({"arm": arm, "gradient_checkpointing": ckpt, "oom": True})
                del model
                torch.cuda.empty_cache()
                continue
            tok_s = micro_batch * 2048 / s
            flops = pythia_flops_per_token(c, n_params, 2048)
            budget = preset.recovery_monotone.max_tokens
            out["runs"].append({
                "arm": arm, "gradient_checkpointing": ckpt, "ms_per_step": 1e3 * s, "tokens_per_s": tok_s,
                # Gradient checkpointing recomputes the forward: MFU counts only useful FLOPs.
                "mfu": tok_s * flops / peak if peak else None,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                "hours_for_preset_budget": budget / tok_s / 3600, "preset_budget_tokens": budget})
            del model
            torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--gpu-micro-batch", type=int, default=load_config("pythia-1.4b").recovery_monotone.micro_batch_size,
                   help="default %(default)s: the pythia-1.4b preset's micro-batch")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    res = {"cpu": cpu_benchmark(args.steps)}
    c = res["cpu"]
    print(f"CPU ({c['threads']} threads), tiny preset model, batch {c['batch'][0]} x {c['batch'][1]}:")
    for arm in ARMS:
        ratio = f"  x{c['step_time_ratio_over_baseline'][arm]:.3f} of the baseline" if arm != "baseline" else ""
        print(f"  {arm:<12} {c[arm]['ms_per_step']:8.1f} ms/step  {c[arm]['tokens_per_s']:10,.0f} tokens/s{ratio}")
    if torch.cuda.is_available():
        g = res["gpu"] = gpu_benchmark(args.steps, args.gpu_micro_batch)
        print(f"GPU {g['device']}: Pythia-1.4B shape, random weights, seq 2048, micro-batch {g['micro_batch']}, "
              "fp32 master + bf16 autocast:")
        for r in g["runs"]:
            tag = f"  {r['arm']:<12} grad-ckpt={'on ' if r['gradient_checkpointing'] else 'off'}"
            if r.get("oom"):
                print(f"{tag}  out of memory")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{tag}  {r['tokens_per_s']:9,.0f} tokens/s  MFU {mfu}  peak {r['peak_memory_gib']:.1f} GiB  "
                  f"preset budget ({r['preset_budget_tokens'] / 1e9:.2f}B tokens): {r['hours_for_preset_budget']:.1f} h")
    else:
        print("GPU: no CUDA device here; the Pythia-1.4B figures need one.")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
