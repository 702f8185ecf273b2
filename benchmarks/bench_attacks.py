#!/usr/bin/env python
"""Attack cost: throughput of the shared core, and damage against compute.

    python benchmarks/bench_attacks.py [--only throughput|budget] [--model PATH] [--work-dir DIR]
                                       [--candidates 256] [--gpu-only] [--json out.json]

throughput  exact candidate re-evaluation batched vs one at a time, and wall time per attacked
            example (HotFlip per text, UAT per trigger search), on the tiny preset's model shape
            with random weights (or a saved model with --model), at the tiny preset's attack
            sizes (skipped with --gpu-only); with CUDA, a Pythia-1.4B-shaped model at the
            pythia-1.4b preset's sizes: candidates/s, seconds per GCG step, perplexity tokens/s.
budget      exact evaluations of a UAT search with and without screening (and the held-out
            damage of each), damage against budget for HotFlip and GCG on the same texts, and
            the A100-hours of the pythia-1.4b preset's UAT per model from those counts. DIR: a
            tiny-preset work dir where stage 0 ran (its pretrained model and test split are
            attacked); without it stage 0 runs in a temporary directory first (about a minute).
"""
import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import GPTNeoXForCausalLM  # noqa: E402

import utils  # noqa: E402,F401
from configs.experiment_config import AttackConfig  # noqa: E402
from configs.presets import load_config  # noqa: E402
from utils.attacks import gcg, hotflip, uat  # noqa: E402
from utils.attacks.core import Victim, forbidden_tokens, select_texts  # noqa: E402
from utils.data.tokenization import TokenFile, load_tokenizer  # noqa: E402
from utils.measure.perplexity import document_nll, rolling_windows  # noqa: E402
from utils.model.modeling import build_tiny_model, load_model  # noqa: E402
from utils.model.monotonicity import apply_monotonicity  # noqa: E402
from utils.run.compute import CPU, Compute  # noqa: E402
from utils.run.run_files import RunPaths  # noqa: E402
from utils.run.time_limits import parameters, peak_bf16  # noqa: E402
from utils.train.memory import model_config  # noqa: E402


# -- throughput ------------------------------------------------------------------

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


def _synced(fn, device: torch.device):
    """(result, seconds) of fn() with the GPU's queue drained before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """This machine's fp32 torch.mm GFLOP/s on the current threads (the best of `repeats` products): the peak
    the attack core's achieved FLOP/s is set against."""
    x, y = torch.randn(size, size), torch.randn(size, size)
    torch.mm(x, y)
    best = min(_synced(lambda: torch.mm(x, y), x.device)[1] for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def swap_scoring(model, a, compute: Compute, repeats: int = 20) -> dict:
    """GCG's exact scoring, one step's search_width single swaps of a text, with every candidate run whole
    and over the text's reused prefix (Victim.nll(..., base=)); and seconds per GCG text both ways."""
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    base = torch.cat([torch.tensor([0]), torch.randint(1, vocab, (a.text_len,), generator=g)])
    cands = []
    for _ in range(a.gcg_search_width):
        c = base.clone()
        c[int(torch.randint(1, len(base), (1,), generator=g))] = int(torch.randint(1, vocab, (1,), generator=g))
        cands.append(c)
    forbidden = torch.zeros(vocab, dtype=torch.bool)
    forbidden[0] = True
    out = {}
    for name, reuse in (("whole", False), ("prefix_reuse", True)):
        victim = Victim(model, compute, a.batch_size, prefix_reuse=reuse)
        victim.nll(cands, base=base)                                      # warm-up
        _, seconds = _synced(lambda: [victim.nll(cands, base=base) for _ in range(repeats)], compute.device)
        out[f"{name}_candidates_per_second"] = repeats * len(cands) / seconds
        _, seconds = _synced(lambda: gcg.attack_text(Victim(model, compute, a.batch_size, prefix_reuse=reuse), base, a,
                                                     forbidden, torch.Generator().manual_seed(1)), compute.device)
        out[f"{name}_gcg_seconds_per_text"] = seconds
    out["speedup"] = out["prefix_reuse_candidates_per_second"] / out["whole_candidates_per_second"]
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


def throughput(model_path, candidates: int) -> dict:
    cfg = load_config("tiny")
    a, cpu = cfg.attack, CPU
    model = load_model(Path(model_path)) if model_path else build_tiny_model(cfg.model, 0)
    model.eval().requires_grad_(False)
    c = {"threads": torch.get_num_threads(), "sequence_tokens": a.text_len + 1, "batch_size": a.batch_size,
         **candidates_per_second(model, candidates, a.text_len + 1, a.batch_size, cpu), **attack_times(model, a, cpu),
         "swaps": swap_scoring(model, a, cpu)}
    # Achieved FLOP/s of exact scoring (2N per token read, N without the input embedding, a lookup) over torch.mm's.
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    c["achieved_gflops"] = c["batched"] * c["sequence_tokens"] * 2 * n / 1e9
    c["matmul_gflops"] = matmul_gflops()
    c["fraction_of_matmul_peak"] = c["achieved_gflops"] / c["matmul_gflops"]
    print(f"CPU ({c['threads']} threads), tiny preset model, candidates of {c['sequence_tokens']} tokens:")
    print(f"  exact re-evaluation: batched (x{a.batch_size}) {c['batched']:,.0f}/s, one at a time "
          f"{c['one_at_a_time']:,.0f}/s, speedup {c['speedup']:.1f}x (target >= 5x)")
    print(f"  achieved {c['achieved_gflops']:.1f} GFLOP/s (2N per token), {100 * c['fraction_of_matmul_peak']:.0f}% of "
          f"torch.mm's {c['matmul_gflops']:.1f} GFLOP/s on the same threads")
    sw = c["swaps"]
    print(f"  GCG's {a.gcg_search_width} single swaps per step: {sw['whole_candidates_per_second']:,.0f}/s run whole, "
          f"{sw['prefix_reuse_candidates_per_second']:,.0f}/s over the reused prefix (x{sw['speedup']:.2f}); GCG "
          f"{sw['whole_gcg_seconds_per_text']:.2f} -> {sw['prefix_reuse_gcg_seconds_per_text']:.2f} s per text "
          f"({a.gcg_steps} steps)")
    print(f"  HotFlip {c['hotflip_seconds_per_text']:.2f} s per text ({a.hotflip_max_flips} flips, beam {a.hotflip_beam}, "
          f"top-k {a.hotflip_top_k}); UAT {c['uat_seconds_per_search']:.1f} s per trigger search "
          f"({a.uat_opt_texts} texts, {a.uat_restarts} restarts, <= {a.uat_max_sweeps} sweeps)")
    return c


def pythia_shape(candidates: int, gcg_steps: int = 3, ppl_docs: int = 8, preset_name: str = "pythia-1.4b",
                 device: str = "cuda") -> dict:
    """A Pythia-1.4B-shaped model with random weights at the pythia-1.4b preset's attack and eval sizes, in
    bf16-mixed, baseline and the preset's monotone construction: exact candidates/s (Victim.nll, text_len + 1
    tokens, the preset's batch), seconds per GCG step (one gradient + gcg_search_width candidates), and
    perplexity's scored tokens/s (documents of 2 x max_len tokens, the preset's stride and batch).
    (preset_name and device let a CPU test run the same code at the tiny preset.)"""
    preset = load_config(preset_name)
    a, e, m = preset.attack, preset.eval, preset.monotone
    dev = torch.device(device)
    compute = Compute(dev, "bf16-mixed")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    peak = peak_bf16(name)
    out = {"device": name, "peak_bf16_flops": peak, "sequence_tokens": a.text_len + 1, "batch_size": a.batch_size,
           "gcg": {"search_width": a.gcg_search_width, "top_k": a.gcg_top_k, "steps_timed": gcg_steps},
           "perplexity": {"max_len": e.max_len, "stride": e.stride, "batch_size": e.batch_size}, "arms": {}}
    for arm in ("baseline", m.construction):
        torch.manual_seed(0)
        with dev:
            model = GPTNeoXForCausalLM(model_config(preset))
        if arm != "baseline":
            apply_monotonicity(model, m.scope, m.activation, m.init_eps, arm, m.init)
        model.eval().requires_grad_(False)
        r = candidates_per_second(model, candidates, a.text_len + 1, a.batch_size, compute)
        vocab = model.get_input_embeddings().weight.shape[0]
        forbidden = torch.zeros(vocab, dtype=torch.bool)
        forbidden[0] = True
        text = torch.cat([torch.tensor([0]), torch.randint(1, vocab, (a.text_len,))])
        victim = Victim(model, compute, a.batch_size)
        search = lambda steps: gcg.attack_text(victim, text, replace(a, gcg_steps=steps), forbidden,  # noqa: E731
                                               torch.Generator().manual_seed(0))
        # Untimed first calls: the first backward and the first 2048-token windows pick and load their
        # kernels (on an H200 that tripled the first arm's GCG step and perplexity times).
        search(1)
        docs = [np.random.default_rng(i).integers(1, vocab, 2 * e.max_len) for i in range(ppl_docs)]
        ppl = lambda ds: document_nll(model, ds, 0, e.max_len, e.stride, e.batch_size, compute)  # noqa: E731
        ppl(docs[:1])
        _, seconds = _synced(lambda: search(gcg_steps), dev)
        r["gcg_seconds_per_step"] = seconds / gcg_steps          # includes the clean pass, once per text
        per_doc, seconds = _synced(lambda: ppl(docs), dev)
        r["perplexity_scored_tokens_per_s"] = sum(n for _, n in per_doc) / seconds
        # FLOP/s as the SLURM time limits count them (2N per token read, 6N per gradient token): what
        # MONO_SLURM_TFLOPS takes, and over the device's peak, the utilisation they assume (MFU measure).
        n, seq = parameters(preset), a.text_len + 1
        read = sum(end - begin - 1 for d in docs for begin, end, _ in rolling_windows(len(d) + 1, e.max_len, e.stride))
        r["counted_tflops"] = {"candidates": r["batched"] * seq * 2 * n / 1e12,
                               "gcg": (6 * n * seq + a.gcg_search_width * 2 * n * seq) / r["gcg_seconds_per_step"] / 1e12,
                               "perplexity": read / seconds * 2 * n / 1e12}
        if peak:
            r["counted_mfu"] = {k: v * 1e12 / peak for k, v in r["counted_tflops"].items()}
        out["arms"][arm] = r
        print(f"{out['device']}, {preset_name} shape, {arm}: candidates of {a.text_len + 1} tokens batched "
              f"(x{a.batch_size}) {r['batched']:,.0f}/s (one at a time {r['one_at_a_time']:,.0f}/s); GCG "
              f"{r['gcg_seconds_per_step']:.2f} s/step (width {a.gcg_search_width}, top-k {a.gcg_top_k}); "
              f"perplexity {r['perplexity_scored_tokens_per_s']:,.0f} scored tokens/s (max_len {e.max_len}, "
              f"stride {e.stride}, batch {e.batch_size}); counted TFLOP/s "
              + ", ".join(f"{k} {v:.0f}" for k, v in r["counted_tflops"].items()))
        del model, victim
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


# -- budget ----------------------------------------------------------------------

# Paper-like UAT search on the tiny model (the issue asks top_k >= 64 and a trigger >= 6 tokens).
UAT = dict(uat_trigger_len=6, uat_top_k=64, uat_beam=1, uat_restarts=1, uat_max_sweeps=3, uat_opt_texts=24,
           uat_eval_texts=24, batch_size=64)
SCREEN = dict(uat_screen_texts=4, uat_screen_keep=8)
GCG_BUDGETS = ((4, 32), (8, 32), (16, 32), (16, 64))        # (steps, search width)
# Assumed A100 throughput for Pythia-1.4B forwards in bf16: 50% of 312 TFLOP/s at ~3.2 GFLOP per token
# (2N + attention; REFERENCE.md's 9.7 GFLOP/token is forward + backward) = ~48,600 tokens/s.
# A gradient pass (forward + backward to the inputs) is counted as 3 forwards.
A100_TOKENS_PER_S = 0.5 * 312e12 / 3.2e9


def _model_dir(work: Path | None) -> Path:
    if work is not None:
        return work
    from utils.stages import setup
    work = Path(tempfile.mkdtemp(prefix="bench_attack_budget_"))
    cfg = load_config("tiny", [("pretrain.max_tokens", "260000"), ("work_dir", str(work))])
    setup(cfg, RunPaths(work, cfg.seed))
    return work


def uat_screening(victim, tok, forbidden, opt, held, init_token) -> dict:
    out = {}
    clean = uat.mean_loss(victim, torch.tensor([], dtype=torch.long), held)[0]
    for name, extra in (("every_candidate_on_every_text", {}), ("screened", SCREEN)):
        a = AttackConfig(**UAT, **extra)
        t0 = time.perf_counter()
        found = uat.find_trigger(victim, opt, a, forbidden, seed=0, init_token=init_token)
        seconds = time.perf_counter() - t0
        attacked = uat.mean_loss(victim, found["trigger"], held)[0]
        out[name] = {"settings": extra, "forward_passes": found["cost"]["forward_passes"],
                     "gradient_passes": found["cost"]["gradient_passes"], "sweeps": found["iterations"],
                     "seconds": seconds, "trigger": tok.decode(found["trigger"].tolist()),
                     "opt_loss": found["loss"], "heldout_abs_delta_nll": attacked - clean}
    full, scr = out["every_candidate_on_every_text"], out["screened"]
    out["fewer_exact_evaluations"] = full["forward_passes"] / scr["forward_passes"]
    out["heldout_damage_ratio"] = scr["heldout_abs_delta_nll"] / full["heldout_abs_delta_nll"]
    return out


def damage_vs_budget(victim, forbidden, texts) -> list[dict]:
    rows = []
    base = AttackConfig()
    runs = [("hotflip", dict(hotflip_max_flips=base.hotflip_max_flips))] + \
           [("gcg", dict(gcg_steps=s, gcg_search_width=w)) for s, w in GCG_BUDGETS]
    for name, extra in runs:
        a = AttackConfig(**extra)
        recs = [hotflip.attack_text(victim, t, a, forbidden) if name == "hotflip" else
                gcg.attack_text(victim, t, a, forbidden, torch.Generator().manual_seed(i)) for i, t in enumerate(texts)]
        n = len(recs)
        rows.append({"attack": name, "settings": extra,
                     "forward_passes_per_text": sum(r["cost"]["forward_passes"] for r in recs) / n,
                     "gradient_passes_per_text": sum(r["cost"]["gradient_passes"] for r in recs) / n,
                     "mean_abs_delta_nll": sum(r["abs_delta_nll"] for r in recs) / n,
                     "success_rate": sum(r["rel_delta_nll"] > a.success_threshold for r in recs) / n})
    return rows


def pythia_uat_hours(sweeps: float) -> dict:
    """A100-hours per model of the pythia-1.4b preset's UAT, from exact-evaluation counts."""
    a = load_config("pythia-1.4b").attack
    seq = a.text_len + a.uat_trigger_len + 1
    grads = a.uat_trigger_len * a.uat_opt_texts * a.uat_beam              # one gradient per position and beam item
    full = a.uat_trigger_len * a.uat_beam * a.uat_top_k * a.uat_opt_texts  # per sweep
    screened = a.uat_trigger_len * a.uat_beam * (a.uat_top_k * a.uat_screen_texts
                                                + a.uat_screen_keep * (a.uat_opt_texts - a.uat_screen_texts))
    hours = lambda fwd: a.uat_restarts * sweeps * (fwd + 3 * grads) * seq / A100_TOKENS_PER_S / 3600  # noqa: E731
    return {"sequence_tokens": seq, "sweeps_per_restart_assumed": sweeps, "restarts": a.uat_restarts,
            "forward_passes_per_sweep": {"unscreened": full, "screened": screened},
            "assumed_a100_tokens_per_s": A100_TOKENS_PER_S,
            "a100_hours_per_model": {"unscreened": hours(full), "screened": hours(screened)}}


def budget(work_dir) -> dict:
    work = _model_dir(work_dir)
    tok = load_tokenizer(work / "shared" / "tokenizer")
    model = load_model(work / "shared" / "models" / "pretrained").eval().requires_grad_(False)
    victim = Victim(model, CPU, 64)
    forbidden = forbidden_tokens(tok, victim.embeddings.shape[0])
    test = TokenFile(work / "shared" / "tokens", "test")
    a = AttackConfig(**UAT)
    opt = [t["ids"] for t in select_texts(test, tok.eos_token_id, a.uat_opt_texts, a.text_len, a.min_text_len, 0)]
    held = [t["ids"] for t in select_texts(test, tok.eos_token_id, a.uat_eval_texts, a.text_len, a.min_text_len, 0,
                                           skip=a.uat_opt_texts)]
    init_token = tok(" the", add_special_tokens=False)["input_ids"][0]

    res = {"threads": torch.get_num_threads(), "uat_settings": UAT}
    res["uat_screening"] = s = uat_screening(victim, tok, forbidden, opt, held, init_token)
    print(f"UAT on the tiny model (trigger {UAT['uat_trigger_len']}, top-k {UAT['uat_top_k']}, "
          f"{UAT['uat_opt_texts']} optimisation texts, {UAT['uat_max_sweeps']} sweeps at most):")
    for name in ("every_candidate_on_every_text", "screened"):
        r = s[name]
        print(f"  {name:<30} {r['forward_passes']:>7,} exact forward passes, {r['sweeps']} sweeps, "
              f"{r['seconds']:.0f} s; held-out dNLL {r['heldout_abs_delta_nll']:+.3f}")
    print(f"  screening: {s['fewer_exact_evaluations']:.1f}x fewer exact evaluations (goal >= 3x), held-out damage "
          f"{100 * s['heldout_damage_ratio']:.0f}% of unscreened (goal >= 95%)")

    res["damage_vs_budget"] = rows = damage_vs_budget(victim, forbidden, opt[:8])
    print("HotFlip vs GCG on the same 8 texts (at most 5 modified tokens):")
    for r in rows:
        print(f"  {r['attack']:<8} {json.dumps(r['settings']):<42} {r['forward_passes_per_text']:>6,.0f} forward + "
              f"{r['gradient_passes_per_text']:>3,.0f} gradient passes/text: dNLL {r['mean_abs_delta_nll']:+.3f}, "
              f"success {100 * r['success_rate']:.0f}%")

    sweeps = max(s["every_candidate_on_every_text"]["sweeps"], s["screened"]["sweeps"])
    res["pythia_1.4b_uat"] = h = {str(n): pythia_uat_hours(n) for n in (sweeps, 10)}
    for n, r in h.items():
        print(f"pythia-1.4b UAT per model at {n} sweeps x {r['restarts']} restarts (assumed A100 "
              f"{r['assumed_a100_tokens_per_s']:,.0f} tokens/s): unscreened {r['a100_hours_per_model']['unscreened']:.2f} "
              f"A100-hours, screened {r['a100_hours_per_model']['screened']:.2f} (goal <= 1)")
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("throughput", "budget"), help="one part (default: both)")
    p.add_argument("--model", help="throughput: a saved model directory (default: random tiny-preset weights)")
    p.add_argument("--work-dir", type=Path, help="budget: a tiny-preset work dir where stage 0 ran")
    p.add_argument("--candidates", type=int, default=256)
    p.add_argument("--gpu-only", action="store_true", help="throughput: skip the CPU half (on a GPU machine)")
    p.add_argument("--json")
    args = p.parse_args()
    res = {}
    if args.only != "budget":
        t = res["throughput"] = {} if args.gpu_only else {"cpu": throughput(args.model, args.candidates)}
        if torch.cuda.is_available():
            t["gpu"] = pythia_shape(args.candidates)
        else:
            print("GPU: no CUDA device here; the Pythia-1.4B figures need one.")
    if args.only != "throughput":
        res["budget"] = budget(args.work_dir)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
