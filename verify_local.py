#!/usr/bin/env python
"""Pre-deployment checks, each real and small (the whole run takes well under a minute):

config, imports, determinism, file_ops, monotonicity, perplexity, training.
Prints a pass/fail table; exits 1 if any check fails.   python verify_local.py
"""
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

SMALL = dict(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=64, context_length=32)


def _small_model(seed=0):
    from configs.experiment_config import ModelConfig
    from utils.model.modeling import build_tiny_model
    return build_tiny_model(ModelConfig(**SMALL), seed)


def check_config():
    from configs.experiment_config import ConfigError
    from configs.presets import PRESETS, load_config
    for name in PRESETS:
        load_config(name)
    try:
        load_config("tiny", [("pretrain.lrr", "1")])
    except ConfigError:
        return f"{len(PRESETS)} presets valid; unknown key rejected"
    raise AssertionError("an unknown config key was accepted")


def check_imports():
    import datasets, lm_eval, numpy, safetensors, tokenizers, torch, transformers, zstandard  # noqa: F401,E401
    import utils  # noqa: F401
    from transformers.activations import ACT2FN
    assert type(ACT2FN["monotone_gelu"]).__name__ == "MonotoneGELU"
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"lm-evaluation-harness {lm_eval.__version__}")


def check_determinism():
    import numpy as np
    import torch
    from configs.experiment_config import TrainConfig
    from utils.data.corpus import stdlib_documents
    from utils.data.tokenization import train_bpe
    from utils.run.compute import CPU
    from utils.train.training import train
    docs = [d["text"] for d in stdlib_documents(200)[:200]]
    assert train_bpe(docs, 300).backend_tokenizer.to_str() == train_bpe(docs, 300).backend_tokenizer.to_str()
    tokens = np.random.default_rng(0).integers(1, SMALL["vocab_size"], 5000).astype(np.uint16)
    t = TrainConfig(max_tokens=16 * 4 * 5, micro_batch_size=4, lr=1e-3, log_interval=1)
    runs = []
    for _ in range(2):
        m = _small_model()
        train(m, tokens, tokens, t, 16, seed=5, compute=CPU, desc="determinism")
        runs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(runs[0], runs[1]), "two identical training runs differ"
    return "tokenizer, data order and 5 training steps bitwise repeatable"


def check_file_ops():
    import torch
    from utils.model.modeling import load_model, save_model
    from utils.model.monotonicity import apply_monotonicity
    from utils.run.run_files import read_json, write_json
    with tempfile.TemporaryDirectory() as tmp:
        write_json(Path(tmp) / "a.json", {"x": 1})
        assert read_json(Path(tmp) / "a.json") == {"x": 1}
        m = _small_model().eval()
        apply_monotonicity(m, "mlp_both", "monotone", 1e-6)
        ids = torch.randint(0, SMALL["vocab_size"], (1, 8))
        save_model(m, Path(tmp) / "model")
        back = load_model(Path(tmp) / "model")
        with torch.no_grad():
            err = (back(input_ids=ids).logits - m(input_ids=ids).logits).abs().max().item()
    assert err < 1e-5, f"saved model differs by {err}"
    return f"atomic JSON and safetensors round trip (max logit diff {err:.1e})"


def check_monotonicity():
    from utils.model.monotonicity import apply_monotonicity, certify
    m = _small_model()
    apply_monotonicity(m, "mlp_both", "monotone", 1e-6)
    good = certify(m, "mlp_both", trials=16, seed=0)
    k = _small_model()
    apply_monotonicity(k, "mlp_both", "keep", 1e-6)
    bad = certify(k, "mlp_both", trials=16, seed=0)
    assert good["monotone"] and not bad["monotone"], "certificate cannot tell monotone from GELU"
    return f"monotone certified; GELU ('keep') caught with {bad['total_violations']} violations"


def check_perplexity():
    import numpy as np
    import torch
    from utils.measure.perplexity import aggregate, document_nll
    from utils.run.compute import CPU
    m = _small_model().eval()
    with torch.no_grad():
        m.get_output_embeddings().weight.zero_()
    docs = [np.arange(1, 50) % SMALL["vocab_size"], np.arange(2, 9)]
    res = aggregate(document_nll(m, docs, 0, 16, 8, 4, CPU))
    assert res["tokens"] == 49 + 7 and math.isclose(res["perplexity"], SMALL["vocab_size"], rel_tol=1e-5)
    return f"uniform model: perplexity {res['perplexity']:.3f} = vocab size, {res['tokens']} tokens scored"


def check_training():
    import numpy as np
    import torch
    from configs.experiment_config import TrainConfig
    from utils.model.monotonicity import apply_monotonicity
    from utils.run.compute import CPU
    from utils.train.training import train, validation_loss
    tokens = np.tile(np.arange(1, 17, dtype=np.uint16), 400)      # a learnable pattern
    m = _small_model()
    apply_monotonicity(m, "mlp_both", "monotone", 1e-6)
    v = m.gpt_neox.layers[0].mlp.dense_h_to_4h.parametrizations.weight.original
    v0 = v.detach().clone()
    before = validation_loss(m, tokens, 16, 8, 32, CPU)
    hist = train(m, tokens, tokens, TrainConfig(max_tokens=8 * 16 * 40, micro_batch_size=8, lr=3e-3,
                                                 log_interval=10), 16, seed=0, compute=CPU, desc="verify")
    moved = (v.detach() != v0).float().mean().item()
    assert hist["val_loss"] < 0.5 * before, f"loss {before:.2f} -> {hist['val_loss']:.2f}"
    assert moved > 0.5, f"only {moved:.0%} of the constrained pre-parameters moved (trap 2)"
    return f"monotone model loss {before:.2f} -> {hist['val_loss']:.2f}; {moved:.0%} of V moved"


CHECKS = [check_config, check_imports, check_determinism, check_file_ops,
          check_monotonicity, check_perplexity, check_training]


def main() -> int:
    rows, t0 = [], time.time()
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            rows.append((name, True, check()))
        except Exception as e:  # a failed check is reported, the others still run
            rows.append((name, False, f"{type(e).__name__}: {e}"))
            traceback.print_exc(file=sys.stderr)
    width = max(len(n) for n, _, _ in rows)
    print()
    for name, ok, detail in rows:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
    passed = sum(ok for _, ok, _ in rows)
    print(f"\n  {passed}/{len(rows)} checks passed in {time.time() - t0:.0f}s")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
