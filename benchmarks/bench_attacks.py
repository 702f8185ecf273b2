#!/usr/bin/env python
"""Attack throughput: exact candidate re-evaluation batched vs one at a time,
and wall time per attacked example (HotFlip per text, UAT per trigger search).

    python benchmarks/bench_attacks.py [--model PATH] [--candidates 256] [--json out.json]

Uses the tiny preset's model shape with random weights (or a saved model with
--model) and the tiny preset's attack sizes, on the CPU; with CUDA, the same
candidate benchmark runs for a Pythia-1.4B-shaped model at text length 256.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import utils  # noqa: E402,F401
from configs.presets import load_config  # noqa: E402
from utils.attacks import hotflip, uat  # noqa: E402
from utils.attacks.core import Victim  # noqa: E402
from utils.model.modeling import build_tiny_model, load_model  # noqa: E402
from utils.run.compute import Compute  # noqa: E402


def candidates_per_second(model, n: int, length: int, batch_size: int, compute: Compute) -> dict:
    device = compute.device
    vocab = model.get_input_embeddings().weight.shape[0]
    seqs = [torch.randint(1, vocab, (length,)) for _ in range(n)]
    Victim(model, compute, batch_size).nll(seqs[:batch_size])            # warm-up
    out = {}
    for name, bs, subset in (("batched", batch_size, seqs), ("one_at_a_time", 1, seqs[: max(8, n // 8)])):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        Victim(model, compute, bs).nll(subset)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = len(subset) / (time.perf_counter() - t0)
    out["speedup"] = out["batched"] / out["one_at_a_time"]
    return out


def attack_times(model, a, compute: Compute) -> dict:
    vocab = model.get_input_embeddings().weight.shape[0]
    forbidden = torch.zeros(vocab, dtype=torch.bool)
    forbidden[0] = True
    g = torch.Generator().manual_seed(0)
    texts = [torch.cat([torch.tensor([0]), torch.randint(1, vocab, (a.text_len,), generator=g)]) for _ in range(4)]
    t0 = time.perf_counter()
    for t in texts:
        hotflip.attack_text(Victim(model, compute, a.batch_size), t, a, forbidden)
    hot = (time.perf_counter() - t0) / len(texts)
    opt = [torch.cat([torch.tensor([0]), torch.randint(1, vocab, (a.text_len,), generator=g)])
           for _ in range(a.uat_opt_texts)]
    t0 = time.perf_counter()
    uat.find_trigger(Victim(model, compute, a.batch_size), opt, a, forbidden, seed=0, init_token=1)
    return {"hotflip_seconds_per_text": hot, "uat_seconds_per_search": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a saved model directory (default: random tiny-preset weights)")
    p.add_argument("--candidates", type=int, default=256)
    p.add_argument("--json")
    args = p.parse_args()
    cfg = load_config("tiny")
    a, cpu = cfg.attack, Compute(torch.device("cpu"), "fp32")
    model = load_model(Path(args.model)) if args.model else build_tiny_model(cfg.model, 0)
    model.eval().requires_grad_(False)
    res = {"cpu": {"threads": torch.get_num_threads(), "sequence_tokens": a.text_len + 1, "batch_size": a.batch_size,
                   **candidates_per_second(model, args.candidates, a.text_len + 1, a.batch_size, cpu),
                   **attack_times(model, a, cpu)}}
    c = res["cpu"]
    print(f"CPU ({c['threads']} threads), tiny preset model, candidates of {c['sequence_tokens']} tokens:")
    print(f"  exact re-evaluation: batched (x{a.batch_size}) {c['batched']:,.0f}/s, one at a time "
          f"{c['one_at_a_time']:,.0f}/s, speedup {c['speedup']:.1f}x (target >= 5x)")
    print(f"  HotFlip {c['hotflip_seconds_per_text']:.2f} s per text ({a.hotflip_max_flips} flips, beam {a.hotflip_beam}, "
          f"top-k {a.hotflip_top_k}); UAT {c['uat_seconds_per_search']:.1f} s per trigger search "
          f"({a.uat_opt_texts} texts, {a.uat_restarts} restarts, <= {a.uat_max_sweeps} sweeps)")
    if torch.cuda.is_available():
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        dev = torch.device("cuda")
        with dev:
            big = GPTNeoXForCausalLM(GPTNeoXConfig(
                vocab_size=50304, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                intermediate_size=8192, max_position_embeddings=2048, use_parallel_residual=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}))
        big.eval().requires_grad_(False)
        g = res["gpu"] = {"device": torch.cuda.get_device_name(),
                          **candidates_per_second(big, args.candidates, 257, 32, Compute(dev, "bf16-mixed"))}
        print(f"GPU {g['device']}, Pythia-1.4B shape, 257 tokens: batched (x32) {g['batched']:,.0f}/s, "
              f"one at a time {g['one_at_a_time']:,.0f}/s, speedup {g['speedup']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
