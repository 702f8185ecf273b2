#!/usr/bin/env python
"""Recovery training on 1 and N processes: throughput and memory per rank (figures, not a test).

    python benchmarks/bench_distributed.py [--nprocs 1,2] [--steps 12] [--json out.json]

Each world size is one `torchrun --standalone` launch of this file running the
real training loop (utils.train.training.train: FSDP2 per layer, each rank a slice of
every optimizer step) on a synthetic token stream, timed over all steps.
CPU (no CUDA): the tiny preset's model with gloo, OMP_NUM_THREADS=1 per rank;
on a 2-core machine this measures the mechanics (collectives, sharding), not
a speed-up. GPU: a Pythia-1.4B-shaped model with NCCL, bf16 compute: tokens/s,
MFU, peak memory. Both print the measured bytes of training state per
parameter and, from it, an estimate of the per-GPU state of Pythia-6.9B
sharded over 8 GPUs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PYTHIA_6_9B_PARAMS = 6_857_302_016        # EleutherAI/pythia-6.9b, embeddings and head included


def worker(args) -> None:
    import numpy as np
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    import utils  # noqa: F401  (registers monotone_gelu)
    from configs.experiment_config import TrainConfig
    from configs.presets import load_config
    from utils.model.modeling import build_tiny_model
    from utils.model.monotonicity import apply_monotonicity
    from utils.run import distributed
    from utils.run.compute import Compute
    from utils.train.training import lm_loss, make_optimizer, train

    cuda = torch.cuda.is_available()
    distributed.init("cuda" if cuda else "cpu")
    compute = Compute.from_config("cuda" if cuda else "cpu", "auto")
    if cuda:
        seq, micro, vocab = 2048, args.gpu_micro_batch, 50304
        config = GPTNeoXConfig(vocab_size=vocab, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                               intermediate_size=8192, hidden_act="gelu", max_position_embeddings=2048,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.25},
                               use_parallel_residual=True, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(config)
    else:
        cfg = load_config("tiny")
        seq, micro, vocab = cfg.data.seq_len, cfg.recovery_monotone.micro_batch_size, cfg.model.vocab_size
        model = build_tiny_model(cfg.model, 0)
    n_params = sum(p.numel() for p in model.parameters())
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6)
    world = distributed.world_size()
    # The global batch is fixed (what the config says); each rank takes 1/world of it.
    accum = args.global_batch // micro
    recipe = TrainConfig(max_tokens=args.steps * args.global_batch * seq, micro_batch_size=micro,
                         grad_accum_steps=accum, log_interval=1, eval_interval=10**9, eval_windows=1,
                         gradient_checkpointing=args.gradient_checkpointing)
    tokens = np.random.default_rng(0).integers(0, vocab, size=(args.steps * args.global_batch + 2) * seq + 1,
                                               dtype=np.int32)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    history = train(model, tokens, tokens[: 4 * seq + 1], recipe, seq, 0, compute, desc=f"{world}proc")
    seconds = time.perf_counter() - start
    # Training state on this rank, measured: sharded fp32 weights, their gradients after a backward,
    # AdamW's state after a step (lr 0: nothing changes).
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t          # noqa: E731
    nbytes = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts)   # noqa: E731
    model.train()
    batch = torch.from_numpy(tokens[: micro * (seq + 1)].astype(np.int64).reshape(micro, seq + 1)).to(compute.device)
    with compute.autocast():
        lm_loss(model, batch).backward()
    opt = make_optimizer(model, recipe, compute.device)
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    state = {"weights": nbytes(model.parameters()), "gradients": nbytes(p.grad for p in model.parameters()),
             "optimizer": nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))}
    totals = dict(zip(state, distributed.sum_across(*map(float, state.values()))))
    steady = [r["tokens_per_s"] for r in history["steps"] if r.get("tokens_per_s")]
    result = {
        "processes": world, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "backend": "nccl" if cuda else "gloo", "threads_per_process": torch.get_num_threads(),
        "model": "pythia-1.4b shape" if cuda else "tiny preset", "parameters": n_params, "seq_len": seq,
        "global_batch": args.global_batch, "micro_batch": micro, "steps": args.steps,
        "seconds_including_setup": seconds, "tokens_per_s": steady[-1] if steady else None,
        "state_bytes_per_parameter_all_ranks": {k: v / n_params for k, v in totals.items()},
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    if cuda and steady:
        from bench_training import pythia_flops_per_token
        from utils.run.time_limits import peak_bf16
        peak = peak_bf16(result["device"])
        flops = pythia_flops_per_token(config, n_params, seq)
        result["mfu"] = steady[-1] * flops / (peak * world) if peak else None
    if distributed.is_main():
        Path(args.out).write_text(json.dumps(result))
    distributed.destroy()


def launch(nproc: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               __file__, "--worker", "--out", str(out), "--steps", str(args.steps),
               "--global-batch", str(args.global_batch), "--gpu-micro-batch", str(args.gpu_micro_batch)]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode != 0:
            raise SystemExit(f"error: the {nproc}-process run failed:\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nprocs", default="1,2", help="world sizes to run (comma-separated)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step (all ranks)")
    p.add_argument("--gpu-micro-batch", type=int, default=4)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    runs = [launch(int(n), args) for n in args.nprocs.split(",")]
    for r in runs:
        mem = f", peak {r['peak_memory_gib']:.1f} GiB per GPU" if r["peak_memory_gib"] is not None else ""
        if r.get("mfu") is not None:
            mem += f", MFU {100 * r['mfu']:.1f}% (goal >= 45% on an H100)"
        print(f"{r['processes']} process(es), {r['backend']} on {r['device']} ({r['threads_per_process']} thread(s) "
              f"each), {r['model']}: {r['tokens_per_s']:,.0f} tokens/s over {r['steps']} steps of "
              f"{r['global_batch']} x {r['seq_len']} tokens{mem}")
    per_param = runs[-1]["state_bytes_per_parameter_all_ranks"]
    bpp = sum(per_param.values())
    per_gpu = PYTHIA_6_9B_PARAMS * bpp / 8 / 2**30
    print(f"measured training state over all {runs[-1]['processes']} ranks, bytes per parameter: "
          + ", ".join(f"{k} {v:.2f}" for k, v in per_param.items()) + f"; total {bpp:.2f}")
    print(f"estimate, Pythia-6.9B ({PYTHIA_6_9B_PARAMS / 1e9:.2f}B parameters) over 8 GPUs: {per_gpu:.1f} GiB of "
          f"weights, gradients and optimizer state per GPU, plus activations and the bf16 all-gathered layers "
          f"in flight (these depend on micro-batch and sequence length)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "state_bytes_per_parameter": bpp,
                                               "pythia_6_9b_state_gib_per_gpu_of_8": per_gpu}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
