"""The rolling-window perplexity routine, pinned by hand-written windows."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs.experiment_config import ModelConfig
from utils.measure.perplexity import aggregate, document_nll, rolling_windows
from utils.model.modeling import build_tiny_model
from utils.run.compute import CPU

SMALL = ModelConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=97, context_length=16)


def test_windows_by_hand():
    assert rolling_windows(7, 3, 2) == [(0, 4, 3), (2, 6, 2), (3, 7, 1)]
    assert rolling_windows(5, 8, 4) == [(0, 5, 4)]                 # fits in one window
    assert rolling_windows(10, 4, 4) == [(0, 5, 4), (4, 9, 4), (5, 10, 1)]   # lm-eval's: stride = max_len
    assert rolling_windows(1, 4, 2) == []                          # an empty document scores nothing


def test_every_target_scored_once_with_context():
    for n in range(2, 40):
        for max_len in (1, 2, 3, 5, 8):
            for stride in range(1, max_len + 1):
                scored = []
                for begin, end, k in rolling_windows(n, max_len, stride):
                    assert end - 1 - begin <= max_len                      # what the model reads
                    assert end - 1 - begin == min(max_len, end - 1)        # as much context as fits
                    assert 1 <= k <= (max_len if not scored else stride)
                    scored += list(range(end - k, end))
                assert scored == list(range(1, n)), (n, max_len, stride)


@pytest.mark.parametrize("max_len", [1, 2, 5, 16])
def test_stride_equal_to_max_len_gives_lm_evaluation_harness_windows(max_len):
    """lm-eval's own window function (loglikelihood_rolling, context_len=1), token for token."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    for n in range(1, 60):
        doc = list(range(100, 100 + n))
        seq = [0] + doc
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(doc, 0, max_len, 1)]
        ours = [(seq[b:e - 1], seq[e - k:e]) for b, e, k in rolling_windows(len(seq), max_len, max_len)]
        # make_disjoint_window trims the inputs that overlap the targets; the model reads the rest.
        assert [(ctx + tgt[:-1], tgt) for ctx, tgt in theirs] == ours, (n, max_len)


def _plain_nll(model, doc, eos, max_len, stride):
    """One window at a time, no batching, no padding: the reference computation."""
    seq = torch.tensor([eos] + list(doc))
    total = 0.0
    for begin, end, k in rolling_windows(len(seq), max_len, stride):
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=seq[None, begin:end - 1]).logits[0].double(), -1)
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


@pytest.mark.slow
def test_stride_equal_to_max_len_reproduces_lm_evaluation_harness_perplexity(tiny_run):
    """lm-eval's HFLM.loglikelihood_rolling on the tiny pretrained model: the same log-likelihoods."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from utils.data.corpus import read_corpus
    from utils.data.tokenization import load_tokenizer
    from utils.model.modeling import load_model
    _, paths = tiny_run
    model = load_model(paths.shared / "models" / "pretrained").eval()
    tokenizer = load_tokenizer(paths.shared / "tokenizer")
    texts = [t for t in read_corpus(paths.shared / "corpus" / "test.jsonl")
             if len(tokenizer(t, add_special_tokens=False)["input_ids"]) > 3 * 48][:4]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=48, batch_size=2, device="cpu")
    theirs = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                      disable_tqdm=True)
    docs = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert len(docs) == 4 and all(len(d) > 3 * 48 for d in docs)   # several windows each
    ours = document_nll(model, docs, tokenizer.eos_token_id, max_len=48, stride=48, batch_size=4, compute=CPU)
    for (nll, n), ll, d in zip(ours, theirs, docs):
        assert n == len(d)
        assert -ll == pytest.approx(nll, rel=1e-5)
