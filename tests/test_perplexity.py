"""The rolling-window perplexity routine, pinned by hand-written windows."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from configs.experiment_config import ModelConfig
from utils.compute import CPU
from utils.modeling import build_tiny_model
from utils.perplexity import aggregate, document_nll, rolling_windows

SMALL = ModelConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=97, context_length=16)


def test_windows_by_hand():
    assert rolling_windows(7, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 7, 1)]
    assert rolling_windows(5, 8, 4) == [(0, 5, 4)]                 # fits in one window
    assert rolling_windows(9, 4, 3) == [(0, 4, 3), (3, 7, 3), (6, 9, 2)]   # lm-eval style: stride = max_len - 1


def test_every_target_scored_once_with_context():
    for n in range(2, 40):
        for max_len in (2, 3, 5, 8):
            for stride in range(1, max_len):
                scored = []
                for begin, end, k in rolling_windows(n, max_len, stride):
                    assert end - begin <= max_len and k <= end - begin - 1
                    scored += list(range(end - k, end))
                assert scored == list(range(1, n)), (n, max_len, stride)


def _plain_nll(model, doc, eos, max_len, stride):
    """One window at a time, no batching, no padding: the reference computation."""
    seq = torch.tensor([eos] + list(doc))
    total = 0.0
    for begin, end, k in rolling_windows(len(seq), max_len, stride):
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=seq[None, begin:end]).logits[0].double(), -1)
        for t in range(end - k, end):
            total -= logp[t - begin - 1, seq[t]].item()
    return total


def test_batched_scoring_equals_plain_computation():
    model = build_tiny_model(SMALL, 0).eval()
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, SMALL.vocab_size, n) for n in (1, 5, 16, 17, 40)]
    got = document_nll(model, docs, 0, max_len=16, stride=8, batch_size=3, compute=CPU)
    for doc, (nll, n) in zip(docs, got):
        assert n == len(doc)
        assert abs(nll - _plain_nll(model, doc, 0, 16, 8)) < 1e-3 * max(1, n)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    model = build_tiny_model(SMALL, 0).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()   # all logits 0: p = 1/V for every token
    docs = [np.arange(1, 30), np.arange(3, 10)]
    res = aggregate(document_nll(model, docs, 0, 8, 4, 4, CPU))
    assert res["tokens"] == 29 + 7
    assert math.isclose(res["perplexity"], SMALL.vocab_size, rel_tol=1e-5)
