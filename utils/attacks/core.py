"""The core shared by every token-level attack (UAT, HotFlip, GCG).

One loss convention for all attacks: the mean next-token NLL over the target
positions, where a target is a token the attacker did not insert or modify
(labels -100 elsewhere). Sequences are [EOS] + text, so every text token,
including the first, is predicted from something.

`Victim` is the attacked model behind the queries every search makes, each
counted (TextAttack's query budget): the exact NLL of candidate sequences (each
candidate of a search computed from its first change on, over the current
sequence's cached keys and values: the prefix is the current one's), the
gradient of their loss w.r.t. the input embeddings (through the model's own
backward pass or a surrogate, utils.attacks.masking), and both at perturbed
embeddings (PGD). `flip_scores` turns a gradient into first-order estimates
(e_b - e_a) . grad of every token swap. `Trace` records a search's best-so-far
objective against the forward passes it has spent (its convergence curve).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from transformers import DynamicCache

from utils.attacks.masking import surrogate
from utils.model.monotonicity import cache_fits, constrained_cache
from utils.model.next_token import final_hidden, row_sums, target_nll
from utils.run import distributed
from utils.run.compute import Compute, halving_on_oom
from utils.run.run_files import PipelineError

def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = 1
    return ids, mask


def target_mask(length: int, excluded=()) -> torch.Tensor:
    """Targets of a sequence [EOS] + ...: every token but EOS and the `excluded` positions."""
    mask = torch.ones(length, dtype=torch.bool)
    mask[0] = False
    mask[list(excluded)] = False
    return mask


def masked_mean(nll: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean of per-position NLL (position t-1 holds token t) over the boolean target mask of tokens."""
    return float(nll[targets[1:]].mean())


@dataclass
class Cost:
    """Exact work an attack asked of the model: sequences and tokens per kind of pass."""
    forward_passes: int = 0          # sequences scored exactly (no gradient)
    forward_tokens: int = 0
    gradient_passes: int = 0         # sequences run forward and backward for an embedding gradient
    gradient_tokens: int = 0
    reused_tokens: int = 0           # prefix tokens of scored sequences not run again (their base's keys and values)

    def copy(self) -> "Cost":
        return replace(self)

    def since(self, start: "Cost") -> dict:
        return {k: v - getattr(start, k) for k, v in asdict(self).items()}


class Trace:
    """A search's convergence curve at no extra cost: (forward passes spent, best objective so far)
    after each unit of search (a GCG step, a HotFlip flip, a UAT sweep), counted from `start`
    (PGD, whose queries are gradient passes, counts those)."""

    def __init__(self, victim: "Victim", start: Cost, count: str = "forward_passes"):
        self.victim, self.start, self.count, self.points = victim, start, count, []

    def add(self, best: float) -> None:
        spent = getattr(self.victim.cost, self.count) - getattr(self.start, self.count)
        self.points.append([spent, float(best)])


class Victim:
    """The attacked model, queried in batches of `batch_size`, with every query counted.

    nll(seqs, targets)   exact next-token NLL at the target positions ([len-1] per sequence,
                         NaN elsewhere); no [batch, length, vocab] tensor exists
                         (utils.model.next_token)
    nll(seqs, targets, base=cur)
                         the same for swaps of `cur` (same length): each sequence runs from the
                         position before its first change on, over cur's keys and values, in
                         buckets of equal start (`prefix_buckets`); earlier positions are cur's
    grads(seqs, targets) per sequence, d(mean target NLL) / d(input embeddings): [len, d];
                         with `surrogate_gradient` exact_gelu, through BPDA's backward pass
    perturbed(seqs, targets, deltas, grad)
                         per sequence, the mean target NLL with `deltas` added to its input
                         embeddings, and (grad=True) its gradient w.r.t. them

    With `shard` under torch.distributed, batch b of every query runs on rank b mod N and
    the answers are gathered in order: each batch is the same computation as in one process,
    so every rank receives the 1-process answer (the cost counts the whole query, not a share).
    """

    def __init__(self, model, compute: Compute, batch_size: int, shard: bool = False,
                 surrogate_gradient: str = "none", prefix_reuse: bool = True):
        self.model, self.compute, self.batch_size = model, compute, batch_size
        self.surrogate_gradient = surrogate_gradient
        self.shard = shard and distributed.world_size() > 1
        self.prefix_reuse = prefix_reuse
        self.cost = Cost()
        self.embeddings = model.get_input_embeddings().weight.detach()
        self.cache_fits = cache_fits(model)         # decided once: every query would otherwise walk the model

    def nll(self, seqs: list[torch.Tensor], targets: list[torch.Tensor] | None = None,
            base: torch.Tensor | None = None) -> list[torch.Tensor]:
        targets = targets or [target_mask(len(s)) for s in seqs]
        self.cost.forward_passes += len(seqs)
        if base is not None and self.prefix_reuse:
            return self._nll_after_prefix(base, seqs, targets)
        self.cost.forward_tokens += sum(len(s) for s in seqs)
        return self._batched(self._nll_batch, seqs, targets)

    def grads(self, seqs: list[torch.Tensor], targets: list[torch.Tensor]) -> list[torch.Tensor]:
        self.cost.gradient_passes += len(seqs)
        self.cost.gradient_tokens += sum(len(s) for s in seqs)
        return self._batched(self._grad_batch, seqs, targets)

    def perturbed(self, seqs: list[torch.Tensor], targets: list[torch.Tensor], deltas: list[torch.Tensor],
                  grad: bool) -> list[tuple[float, torch.Tensor | None]]:
        kind = "gradient" if grad else "forward"
        setattr(self.cost, f"{kind}_passes", getattr(self.cost, f"{kind}_passes") + len(seqs))
        setattr(self.cost, f"{kind}_tokens", getattr(self.cost, f"{kind}_tokens") + sum(len(s) for s in seqs))
        return self._batched(lambda s, t, d: self._perturbed_batch(s, t, d, grad), seqs, targets, deltas)

    def _batched(self, fn, seqs, targets, deltas=None) -> list:
        bs = self.batch_size
        return self._run(fn, [(seqs[i:i + bs], targets[i:i + bs]) + ((deltas[i:i + bs],) if deltas is not None else ())
                              for i in range(0, len(seqs), bs)])

    def _run(self, fn, batches: list[tuple]) -> list:
        """fn over each batch (a tuple of lists), answers in order; sharded by batch under `shard`."""
        if not self.shard:
            return [r for b in batches for r in halving_on_oom(fn, *b)]
        rank, n = distributed.rank(), distributed.world_size()
        mine = [halving_on_oom(fn, *b) for b in batches[rank::n]]
        parts = distributed.gather_objects(mine)
        return [r for i in range(len(batches)) for r in parts[i % n][i // n]]

    @torch.no_grad()
    def _nll_batch(self, seqs, targets) -> list[torch.Tensor]:
        ids, labels, mask = self._inputs(seqs, targets)
        with self.compute.autocast(), constrained_cache(self.model, fits=self.cache_fits):
            nll = target_nll(self.model, final_hidden(self.model, ids, mask)[:, :-1], labels[:, 1:])
        out = torch.full(labels[:, 1:].shape, float("nan"))
        out[(labels[:, 1:] != -100).cpu()] = nll.float().cpu()
        return [out[r, :len(s) - 1] for r, s in enumerate(seqs)]

    def _nll_after_prefix(self, base: torch.Tensor, seqs, targets) -> list[torch.Tensor]:
        """nll(seqs, targets) for swaps of `base`. A sequence whose first change is token p shares the
        predictions of tokens 1..p-1 with base: it runs from position p-1 on (predicting p onwards) over
        base's keys and values of positions < p-1, and the NLL of the shared predictions is base's."""
        n = len(base)
        if any(len(s) != n for s in seqs):
            raise ValueError("prefix reuse scores swaps of the base sequence: every sequence has its length")
        base_nll, kv = self._prefix_states(base)
        starts = []
        for s in seqs:
            changed = (s != base).nonzero()
            starts.append(max(int(changed[0]) - 1, 0) if len(changed) else n - 1)
        order = sorted(range(len(seqs)), key=starts.__getitem__)
        groups = [[order[j] for j in b] for b in prefix_buckets([starts[i] for i in order], n - 1, self.batch_size,
                                                                 BUCKET_OVERHEAD_TOKENS.get(self.compute.device.type, 96))]
        batches = [([seqs[i] for i in g], [targets[i] for i in g], [starts[g[0]]] * len(g)) for g in groups]
        for seqs_b, _, start in batches:
            self.cost.forward_tokens += len(seqs_b) * (n - 1 - start[0])
            self.cost.reused_tokens += len(seqs_b) * (start[0] + 1)
        suffixes = self._run(lambda s, t, start: self._suffix_batch(kv, s, t, start[0]), batches)
        out = [None] * len(seqs)
        flat = [(i, b[2][0]) for g, b in zip(groups, batches) for i in g]
        for (i, start), suffix in zip(flat, suffixes):
            shared = torch.where(targets[i][1:start + 1], base_nll[:start], float("nan"))
            out[i] = torch.cat([shared, suffix])
        return out

    def _prefix_states(self, base: torch.Tensor) -> tuple[torch.Tensor, list]:
        """[len-1] NLL of every token of `base`, and per layer its keys and values (positions < len-1)."""
        cache = DynamicCache()
        ids = base[None, :-1].to(self.compute.device)
        with torch.no_grad(), self.compute.autocast(), constrained_cache(self.model, fits=self.cache_fits):
            hidden = final_hidden(self.model, ids, cache=cache)[0]
            nll = target_nll(self.model, hidden, base[1:].to(ids.device), every=True)
        self.cost.forward_tokens += len(base) - 1
        return nll.float().cpu(), [(layer.keys, layer.values) for layer in cache.layers]

    @torch.no_grad()
    def _suffix_batch(self, kv: list, seqs, targets, start: int) -> list[torch.Tensor]:
        """NLL at positions start..len-2 (NaN off target) of same-length sequences that equal the prefix
        state `kv` before `start`."""
        ids = torch.stack(seqs)
        labels = torch.where(torch.stack(targets), ids, -100)[:, start + 1:]
        out = torch.full(labels.shape, float("nan"))
        if start == ids.shape[1] - 1:          # unchanged sequences: nothing left to predict
            return list(out)
        cache = DynamicCache()
        if start:
            for layer, (k, v) in enumerate(kv):
                cache.update(k[:, :, :start].expand(len(seqs), -1, -1, -1),
                             v[:, :, :start].expand(len(seqs), -1, -1, -1), layer)
        dev = self.compute.device
        with self.compute.autocast(), constrained_cache(self.model, fits=self.cache_fits):
            hidden = final_hidden(self.model, ids[:, start:-1].to(dev), cache=cache)
            nll = target_nll(self.model, hidden, labels.to(dev))
        out[labels != -100] = nll.float().cpu()
        return list(out)

    def _grad_batch(self, seqs, targets) -> list[torch.Tensor]:
        ids, labels, mask = self._inputs(seqs, targets)
        emb = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self._mean_nll(emb, labels, mask).sum(), emb)
        grad = grad.float().cpu()
        return [grad[r, :len(s)] for r, s in enumerate(seqs)]

    def _perturbed_batch(self, seqs, targets, deltas, grad: bool) -> list[tuple[float, torch.Tensor | None]]:
        ids, labels, mask = self._inputs(seqs, targets)
        delta = torch.zeros(*ids.shape, self.embeddings.shape[1], device=ids.device)
        for r, d in enumerate(deltas):
            delta[r, :len(d)] = d.to(delta.device)
        delta.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            emb = self.model.get_input_embeddings()(ids).detach() + delta
            per_seq = self._mean_nll(emb, labels, mask)
        g = torch.autograd.grad(per_seq.sum(), delta)[0].float().cpu() if grad else None
        return [(float(per_seq[r].detach()), g[r, :len(s)] if grad else None) for r, s in enumerate(seqs)]

    def _mean_nll(self, emb, labels, mask) -> torch.Tensor:
        """[batch] mean target NLL from input embeddings; the backward pass through the surrogate, if any."""
        with self.compute.autocast(), surrogate(self.model, self.surrogate_gradient):
            hidden = final_hidden(self.model, inputs_embeds=emb, attention_mask=mask)[:, :-1]
            nll = row_sums(target_nll(self.model, hidden, labels[:, 1:]), labels[:, 1:])
        return nll.float() / (labels[:, 1:] != -100).sum(1).clamp(min=1)

    def _inputs(self, seqs, targets):
        """Right-padded ids, labels (-100 off target) and the mask, on the device; no mask where every
        sequence has the same length (every candidate batch of an attack: SDPA's fast causal path)."""
        ids, mask = _pad(seqs)
        labels = torch.full_like(ids, -100)
        for r, (s, tgt) in enumerate(zip(seqs, targets)):
            labels[r, :len(s)] = torch.where(tgt, s, torch.full_like(s, -100))
        dev = self.compute.device
        mask = None if all(len(s) == ids.shape[1] for s in seqs) else mask.to(dev)
        return ids.to(dev), labels.to(dev), mask


# What one more forward call costs beside its tokens, in tokens: on 2 CPU cores a tiny-preset call of one
# token takes as long as ~77 tokens in a batch, and 96 scored GCG's candidates fastest (24..400 tried,
# benchmarks/bench_attacks.py); on a GPU a short call is launch-bound: a guess, not measured.
BUCKET_OVERHEAD_TOKENS = {"cpu": 96, "cuda": 2048}


def prefix_buckets(starts: list[int], length: int, max_size: int, overhead: int) -> list[list[int]]:
    """Split sequences sorted by start position into consecutive buckets of at most `max_size`, each run
    from its first member's start: the split minimising the tokens run, plus `overhead` per forward call
    (dynamic programming; a bucket of only finished sequences, start == length, runs nothing)."""
    n = len(starts)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_size), j):
            run = (j - i) * (length - starts[i])
            cost = best[i] + (run + overhead if run else 0)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], n
    while j:
        buckets.append(list(range(cut[j], j)))
        j = cut[j]
    return buckets[::-1]


def top_candidates(grad: torch.Tensor, current: torch.Tensor, embeddings: torch.Tensor, forbidden: torch.Tensor,
                   k: int) -> torch.Tensor:
    """[P, k] tokens with the highest first-order gain at each of P positions (never the current one)."""
    dev = embeddings.device
    scores = flip_scores(grad.to(dev), current.to(dev), embeddings, forbidden.to(dev))
    return scores.topk(min(k, scores.shape[1] - 1), dim=1).indices.cpu()


def flip_scores(grad: torch.Tensor, current: torch.Tensor, embeddings: torch.Tensor,
                forbidden: torch.Tensor) -> torch.Tensor:
    """First-order loss change of replacing `current[i]` by token b at each position i.

    grad: [P, d] gradients at P positions, current: [P] token ids there,
    embeddings: [V, d], forbidden: [V] bool (special tokens). Returns [P, V];
    the current token and forbidden tokens score -inf.
    """
    e = embeddings.float()
    scores = grad @ e.T - (grad * e[current]).sum(-1, keepdim=True)
    scores[:, forbidden] = float("-inf")
    scores[torch.arange(len(current)), current] = float("-inf")
    return scores


def forbidden_tokens(tokenizer, vocab_rows: int) -> torch.Tensor:
    """Special tokens, and embedding rows past the tokenizer's vocabulary (Pythia pads 50,277 to 50,304).

    Special means a named role (all_special_ids) or an added token marked special: Pythia's
    `<|padding|>` (id 1) has no role, and transformers 5's all_special_ids omits it."""
    mask = torch.zeros(vocab_rows, dtype=torch.bool)
    special = set(tokenizer.all_special_ids)
    special |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    mask[[i for i in special if i < vocab_rows]] = True
    mask[len(tokenizer):] = True
    return mask


def select_texts(token_file, eos_id: int, n: int, text_len: int, min_len: int, seed: int,
                 skip: int = 0) -> list[dict]:
    """`n` test documents of >= min_len tokens, in a seed-dependent order, truncated to text_len.

    Each record holds the document index and the sequence [EOS] + text.
    `skip` leaves out the first `skip` eligible documents of that order (disjoint sets).
    """
    order, reserved = np.random.default_rng([seed, 7]).permutation(len(token_file)), skip
    picked = []
    for i in order:
        doc = token_file.document(int(i))
        if len(doc) < min_len:
            continue
        if skip:
            skip -= 1
            continue
        picked.append({"doc": int(i), "ids": torch.tensor([eos_id, *doc[:text_len].tolist()])})
        if len(picked) == n:
            break
    if len(picked) < n:      # stage 0 checks the sizes: this is a split changed since
        raise PipelineError(f"{len(picked)} test documents of >= {min_len} tokens are left after the first {reserved} "
                            f"(reserved for another purpose); {n} requested: rerun stage 0 or lower the counts")
    return picked
