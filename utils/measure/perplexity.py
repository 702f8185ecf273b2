"""Rolling-window perplexity: every token scored exactly once, per document.

Convention (stated in every result that uses it): each document d is scored as
the sequence [EOS] + d, so its first token is predicted from EOS (Pythia's
bos = eos = 0) and exactly len(d) tokens are scored. The targets are cut into
consecutive chunks: the first ends at token max_len, each next one `stride`
tokens later. Each window feeds the model the (at most) `max_len` tokens just
before its last target and scores only its chunk (the rest is context, label
-100), so every target sees at least max_len - stride earlier tokens (all of
them in the first window) and the last window as many as fit. With
stride = max_len these are exactly lm-evaluation-harness's
loglikelihood_rolling windows (tested against lm_eval.utils); a smaller
stride gives more context at max_len / stride times the cost (HF "perplexity
of fixed-length models"). Aggregation is exp(sum NLL / sum tokens), never a
mean of per-document values.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from utils.model.monotonicity import constrained_cache
from utils.model.next_token import final_hidden, row_sums, target_nll
from utils.run import distributed
from utils.run.compute import Compute, halving_on_oom


def rolling_windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, n_targets) over a sequence of n tokens whose first is context only.

    The model reads seq[begin:end-1] (at most max_len tokens) and the window scores the last
    n_targets tokens of seq[begin+1:end]. Example: n=7, max_len=3, stride=2 ->
    [(0, 4, 3), (2, 6, 2), (3, 7, 1)]: tokens 1-3, then 4-5 (read: 2-4), then 6 (read: 3-5);
    every target 1..6 exactly once.
    """
    if not 0 < stride <= max_len:
        raise ValueError(f"need 0 < stride <= max_len, got stride={stride}, max_len={max_len}")
    windows, scored_to, end = [], 1, min(n, max_len + 1)
    while end > scored_to:
        windows.append((max(0, end - 1 - max_len), end, end - scored_to))
        scored_to, end = end, min(n, end + stride)
    return windows


@torch.no_grad()
def score_windows(model, seqs: list[np.ndarray], compute: Compute) -> list[float]:
    """Sum of target NLLs per (window tokens, n_targets) row: the model reads all but the last
    token of each window, rows right-padded into one batch."""
    width = max(len(s) for s, _ in seqs) - 1
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, (s, n_targets) in enumerate(seqs):
        n = len(s) - 1
        ids[r, :n] = torch.from_numpy(s[:-1])
        labels[r, n - n_targets:n] = torch.from_numpy(s[len(s) - n_targets:])
        mask[r, :n] = 1
    # Windows of one length (batched together by document_nll) need no mask: SDPA's fast causal path.
    mask = None if all(len(s) - 1 == width for s, _ in seqs) else mask.to(compute.device)
    ids, labels = ids.to(compute.device), labels.to(compute.device)
    with compute.autocast(), constrained_cache(model):     # softplus(V) once per forward where it fits
        nll = target_nll(model, final_hidden(model, ids, mask), labels)
    return row_sums(nll, labels).tolist()


def document_nll(model, docs: list[np.ndarray], eos_id: int, max_len: int, stride: int,
                 batch_size: int, compute: Compute, shard: bool = False) -> list[tuple[float, int]]:
    """(sum NLL, tokens scored) for each document, windows batched across documents.

    Windows are batched longest first (lm-eval's order: equal-length batches need no padding or
    mask, and a batch that does not fit fails at the start). With `shard` under torch.distributed,
    batch b runs on rank b mod N and every rank gets every document's sums, added in batch order:
    each batch is the computation one process makes, so the result is the same whatever N.
    On CUDA out-of-memory a batch is retried in halves, never dropped.
    """
    rows = []   # (doc index, window tokens, n_targets)
    for i, d in enumerate(docs):
        seq = np.concatenate([[eos_id], np.asarray(d, dtype=np.int64)])
        for begin, end, n_targets in rolling_windows(len(seq), max_len, stride):
            rows.append((i, seq[begin:end], n_targets))
    rows.sort(key=lambda r: -len(r[1]))
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    ranks = distributed.world_size() if shard else 1
    mine = {b: _scored(model, batches[b], compute) for b in range(distributed.rank() if shard else 0, len(batches), ranks)}
    if ranks > 1:
        mine = {b: sums for part in distributed.gather_objects(mine) for b, sums in part.items()}
    totals = [[0.0, 0] for _ in docs]
    for b, batch in enumerate(batches):
        for (i, _, n), s in zip(batch, mine[b]):
            totals[i][0] += s
            totals[i][1] += n
    return [(nll, n) for nll, n in totals]


def _scored(model, batch: list, compute: Compute) -> list[float]:
    return halving_on_oom(lambda b: score_windows(model, [(s, n) for _, s, n in b], compute), batch)


def aggregate(per_doc: list[tuple[float, int]]) -> dict:
    nll = sum(x for x, _ in per_doc)
    n = sum(k for _, k in per_doc)
    return {"nll_sum": nll, "tokens": n, "mean_nll": nll / n, "perplexity": math.exp(nll / n)}
