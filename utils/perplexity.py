"""Rolling-window perplexity: every token scored exactly once, per document.

Convention (stated in every result that uses it): each document d is scored as
the sequence [EOS] + d, so its first token is predicted from EOS (Pythia's
bos = eos = 0) and exactly len(d) tokens are scored. Windows of at most
`max_len` tokens advance by `stride`; a window scores only the tokens the
previous one did not (context tokens get label -100), so every token keeps as
much left context as the window allows (HF "perplexity of fixed-length models",
lm-evaluation-harness rolling loglikelihood when stride = max_len - 1).
Aggregation is exp(sum NLL / sum tokens), never a mean of per-document values.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from utils.compute import Compute


def rolling_windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, n_targets) over a sequence of n tokens whose first is context only.

    The window covers seq[begin:end] and scores its last n_targets tokens.
    Example: n=7, max_len=4, stride=2 -> [(0, 4, 3), (2, 6, 2), (4, 7, 1)]:
    tokens 1-3, then 4-5, then 6; every target 1..6 exactly once.
    """
    if not 0 < stride < max_len:
        raise ValueError(f"need 0 < stride < max_len, got stride={stride}, max_len={max_len}")
    windows, scored_to = [], 1
    for begin in range(0, n, stride):
        end = min(begin + max_len, n)
        if end > scored_to:
            windows.append((begin, end, end - scored_to))
            scored_to = end
        if end == n:
            break
    return windows


@torch.no_grad()
def score_windows(model, seqs: list[np.ndarray], compute: Compute) -> list[float]:
    """Sum of target NLLs per (input_ids, n_targets) row, right-padded into one batch."""
    width = max(len(s) for s, _ in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, (s, n_targets) in enumerate(seqs):
        ids[r, :len(s)] = torch.from_numpy(s)
        labels[r, len(s) - n_targets:len(s)] = ids[r, len(s) - n_targets:len(s)]
        mask[r, :len(s)] = 1
    ids, labels, mask = ids.to(compute.device), labels.to(compute.device), mask.to(compute.device)
    with compute.autocast(), parametrize.cached():     # softplus(V) once per forward
        logits = model(input_ids=ids, attention_mask=mask).logits
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none")
    return nll.sum(dim=1).tolist()


def document_nll(model, docs: list[np.ndarray], eos_id: int, max_len: int, stride: int,
                 batch_size: int, compute: Compute) -> list[tuple[float, int]]:
    """(sum NLL, tokens scored) for each document, windows batched across documents.

    On CUDA out-of-memory the same windows are retried in smaller batches, never dropped.
    """
    rows = []   # (doc index, window tokens, n_targets)
    for i, d in enumerate(docs):
        seq = np.concatenate([[eos_id], np.asarray(d, dtype=np.int64)])
        for begin, end, n_targets in rolling_windows(len(seq), max_len, stride):
            rows.append((i, seq[begin:end], n_targets))
    totals = [[0.0, 0] for _ in docs]
    start, bs = 0, batch_size
    while start < len(rows):
        chunk = rows[start:start + bs]
        try:
            sums = score_windows(model, [(s, n) for _, s, n in chunk], compute)
        except torch.cuda.OutOfMemoryError:
            if bs == 1:
                raise
            torch.cuda.empty_cache()
            bs = max(1, bs // 2)
            continue
        for (i, _, n), s in zip(chunk, sums):
            totals[i][0] += s
            totals[i][1] += n
        start += len(chunk)
    return [(nll, n) for nll, n in totals]


def aggregate(per_doc: list[tuple[float, int]]) -> dict:
    nll = sum(x for x, _ in per_doc)
    n = sum(k for _, k in per_doc)
    return {"nll_sum": nll, "tokens": n, "mean_nll": nll / n, "perplexity": math.exp(nll / n)}
