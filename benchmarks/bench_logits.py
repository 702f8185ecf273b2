#!/usr/bin/env python
"""What scoring without full logits buys: perplexity speed against lm-eval, and training memory.

    python scripts/stage_0_setup.py --work-dir WORK        # once: the tiny preset's model, tokenizer, test split
    python benchmarks/bench_logits.py --work-dir WORK [--json out.json]

1. Perplexity, side by side in one run: utils.measure.perplexity.document_nll against
   lm-evaluation-harness's HFLM.loglikelihood_rolling on the same model (the tiny preset's
   pretrained one), the same test documents, lm-eval's own windows (stride = max_len) and
   the same batch size. Prints seconds (best of --repeats) and the largest relative
   difference of a document's log-likelihood.
2. Peak memory of one training micro-step (forward and backward, float32, CPU) on a
   Pythia-410M-shaped GPT-NeoX with random weights, by torch's MemTracker: the loss from full
   [batch, length, vocab] logits with a float32 copy (what utils.train.training.lm_loss
   computed before) against lm_loss's chunked target-only cross-entropy.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

import utils  # noqa: E402,F401
from utils.data.corpus import read_corpus  # noqa: E402
from utils.data.tokenization import load_tokenizer  # noqa: E402
from utils.measure.perplexity import document_nll  # noqa: E402
from utils.model.modeling import load_model  # noqa: E402
from utils.run.compute import CPU  # noqa: E402
from utils.train.training import lm_loss  # noqa: E402


def best_of(repeats, fn):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def perplexity_vs_lm_eval(work: Path, n_docs: int, max_len: int, batch_size: int, repeats: int) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    model = load_model(work / "shared" / "models" / "pretrained").eval()
    tokenizer = load_tokenizer(work / "shared" / "tokenizer")
    texts = read_corpus(work / "shared" / "corpus" / "test.jsonl")[:n_docs]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_len, batch_size=batch_size, device="cpu")
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    docs = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    lm_eval_s, theirs = best_of(repeats, lambda: lm.loglikelihood_rolling(requests, disable_tqdm=True))
    ours_s, ours = best_of(repeats, lambda: document_nll(model, docs, tokenizer.eos_token_id, max_len, max_len,
                                                         batch_size, CPU))
    rel = max(abs(-ll - nll) / max(abs(ll), 1e-30) for ll, (nll, _) in zip(theirs, ours))
    return {"documents": len(docs), "tokens": int(sum(len(d) for d in docs)), "max_len": max_len,
            "batch_size": batch_size, "threads": torch.get_num_threads(), "lm_eval_seconds": lm_eval_s,
            "ours_seconds": ours_s, "speedup": lm_eval_s / ours_s, "max_relative_difference": rel}


def pythia_410m_shaped() -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096, max_position_embeddings=2048, use_parallel_residual=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                           tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config)


def full_logits_loss(model, batch):
    """The loss lm_loss computed before: full logits, a float32 copy, cross-entropy over all of it."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def micro_step_memory(loss_fn, batch_size: int, seq_len: int) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker
    model = pythia_410m_shaped().train()
    batch = torch.randint(0, 50277, (batch_size, seq_len + 1))
    tracker = MemTracker()
    tracker.track_external(model)
    t0 = time.perf_counter()
    with tracker:
        loss_fn(model, batch).backward()
    seconds = time.perf_counter() - t0
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    gib = {str(k).split(".")[-1].lower(): v / 2**30 for k, v in peak.items()}
    del model
    return {"peak_gib": gib, "seconds": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True, help="a finished stage 0 of the tiny preset")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-batch", type=int, default=1, help="micro-batch of the 410M-shaped training step")
    ap.add_argument("--train-seq", type=int, default=2048)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not (args.work_dir / "shared" / "models" / "pretrained" / "config.json").exists():
        sys.exit(f"error: {args.work_dir} holds no finished stage 0 of the tiny preset "
                 f"(python scripts/stage_0_setup.py --work-dir {args.work_dir})")
    out = {"perplexity": perplexity_vs_lm_eval(args.work_dir, args.docs, args.max_len, args.batch_size, args.repeats)}
    p = out["perplexity"]
    print(f"perplexity, {p['documents']} documents ({p['tokens']:,} tokens), windows of {p['max_len']}, "
          f"batch {p['batch_size']}, {p['threads']} threads:")
    print(f"  lm-eval loglikelihood_rolling {p['lm_eval_seconds']:8.2f} s")
    print(f"  document_nll                  {p['ours_seconds']:8.2f} s  ({p['speedup']:.2f}x lm-eval's speed)")
    print(f"  largest relative difference of a document's log-likelihood: {p['max_relative_difference']:.1e}")
    if not args.skip_memory:
        shape = f"{args.train_batch} x {args.train_seq}"
        out["training_micro_step"] = {"shape": "pythia-410m (random weights), float32, CPU", "batch": shape}
        for name, fn in (("full_logits", full_logits_loss), ("chunked", lm_loss)):
            out["training_micro_step"][name] = m = micro_step_memory(fn, args.train_batch, args.train_seq)
            cats = ", ".join(f"{k} {v:.2f}" for k, v in m["peak_gib"].items() if v >= 0.005 and k != "total")
            print(f"training micro-step ({shape}), {name:<11}: peak {m['peak_gib']['total']:.2f} GiB ({cats}); "
                  f"{m['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
