"""Held-out text that repeats training text: shared token n-grams between splits.

A held-out document's containment is the fraction of its n-grams of SHINGLE
consecutive tokens (never across a document boundary) that also occur somewhere
in the training split; above a threshold it is a near-duplicate of training
text, and its loss measures memorisation rather than generalisation. Exact
duplicates are the special case containment = 1.

Hashes are computed with numpy over the token files stage 0 writes, so the
check costs seconds per hundred million tokens. Large training splits are
sampled by hash: only n-grams whose hash is 0 modulo `sample` are kept, on both
sides, so the containment is an unbiased estimate from those n-grams (the
report states the rate; the tiny corpus uses every n-gram).
"""
from __future__ import annotations

import numpy as np

from utils.data.tokenization import TokenFile

SHINGLE = 12                         # tokens per n-gram (about 9 words of English)
_P = np.uint64(0x9E3779B97F4A7C15)   # odd multiplier of the polynomial hash (mod 2^64)
_CHUNK = 1 << 24                     # tokens hashed at a time: memory stays flat


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: low bits uniform, so `hash % sample` samples fairly."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def ngram_hashes(tokens: np.ndarray, boundary: int, sample: int = 1, n: int = SHINGLE) -> np.ndarray:
    """Hashes of the n-grams of `tokens` that contain no `boundary` token, kept 1 in `sample` by hash."""
    t = np.asarray(tokens, dtype=np.uint64)
    if len(t) < n:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(len(t) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _P + t[j:len(t) - n + 1 + j]
        h = _mix(h)
    crossing = np.convolve((t == boundary).astype(np.int32), np.ones(n, dtype=np.int32), mode="valid") > 0
    h = h[~crossing]
    return h[h % np.uint64(sample) == 0] if sample > 1 else h


def _sorted_unique(h: np.ndarray) -> np.ndarray:
    # np.unique / np.isin on uint64 are 50-100x slower than a sort here (numpy 2.4).
    h = np.sort(h)
    return h[np.concatenate([[True], h[1:] != h[:-1]])] if len(h) else h


def _contains(sorted_unique: np.ndarray, h: np.ndarray) -> np.ndarray:
    if not len(sorted_unique):
        return np.zeros(len(h), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_unique, h), len(sorted_unique) - 1)
    return sorted_unique[i] == h


def training_ngrams(train: TokenFile, boundary: int, sample: int) -> np.ndarray:
    """Sorted unique (sampled) n-gram hashes of the whole training split, a chunk at a time."""
    tokens, parts = train.tokens, []
    for start in range(0, len(tokens), _CHUNK):
        parts.append(_sorted_unique(ngram_hashes(tokens[start:start + _CHUNK + SHINGLE - 1], boundary, sample)))
    return _sorted_unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)


def sampling_rate(train_tokens: int) -> int:
    """1 up to 32M training tokens, then the power of two keeping about 32M n-grams."""
    rate = 1
    while train_tokens // rate > 1 << 25:
        rate *= 2
    return rate


def heldout_overlap(train: TokenFile, heldout: TokenFile, boundary: int, threshold: float) -> dict:
    """Per held-out document: containment in the training split; which are near-duplicates."""
    sample = sampling_rate(len(train.tokens))
    seen = training_ngrams(train, boundary, sample)
    containment = []
    for i in range(len(heldout)):
        h = ngram_hashes(heldout.document(i), boundary, sample)
        containment.append(float(_contains(seen, h).mean()) if len(h) else None)
    near = [i for i, c in enumerate(containment) if c is not None and c > threshold]
    return {"documents": len(heldout), "near_duplicates": len(near), "near_duplicate_docs": near,
            "fraction": len(near) / max(len(heldout), 1), "threshold": threshold, "shingle_tokens": SHINGLE,
            "sample_rate": sample, "too_short_to_check": sum(c is None for c in containment),
            "max_containment": max((c for c in containment if c is not None), default=None),
            "containment": containment}
