"""The core shared by every token-level attack (UAT, HotFlip, and later ones).

One loss convention for all attacks: the mean next-token NLL over the target
positions, where a target is a token the attacker did not insert or modify
(labels -100 elsewhere). Sequences are [EOS] + text, so every text token,
including the first, is predicted from something.

Pieces, in the order an attack uses them:
  per_token_nll      exact per-position NLL of a batch of sequences (right-padded)
  exact_nll          the same for many sequences, in batches of `batch_size`
  embedding_grads    gradient of the summed target loss w.r.t. the input embeddings
  flip_scores        first-order estimate (e_b - e_a) . grad of swapping token a for b
                     at each position, with forbidden tokens at -inf
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from utils.compute import Compute
from utils.run_files import PipelineError


def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = 1
    return ids, mask


@torch.no_grad()
def per_token_nll(model, seqs: list[torch.Tensor], compute: Compute) -> list[torch.Tensor]:
    """NLL of token t given tokens < t, for t = 1 .. len-1 of each sequence (float32, CPU)."""
    ids, mask = _pad(seqs)
    ids = ids.to(compute.device)
    # Equal lengths (every candidate batch of an attack) need no mask: SDPA then
    # takes its fast causal path.
    mask = None if all(len(s) == ids.shape[1] for s in seqs) else mask.to(compute.device)
    with compute.autocast(), parametrize.cached():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                          reduction="none").view(len(seqs), -1).cpu()
    return [nll[r, :len(s) - 1] for r, s in enumerate(seqs)]


def exact_nll(model, seqs: list[torch.Tensor], compute: Compute, batch_size: int) -> list[torch.Tensor]:
    """per_token_nll over any number of sequences; on CUDA OOM the batch is halved, never dropped."""
    out, start, bs = [], 0, batch_size
    while start < len(seqs):
        try:
            out += per_token_nll(model, seqs[start:start + bs], compute)
            start += bs
        except torch.cuda.OutOfMemoryError:
            if bs == 1:
                raise
            torch.cuda.empty_cache()
            bs //= 2
    return out


def target_mask(length: int, excluded=()) -> torch.Tensor:
    """Targets of a sequence [EOS] + ...: every token but EOS and the `excluded` positions."""
    mask = torch.ones(length, dtype=torch.bool)
    mask[0] = False
    mask[list(excluded)] = False
    return mask


def masked_mean(nll: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean of per-position NLL (position t-1 holds token t) over the boolean target mask of tokens."""
    return float(nll[targets[1:]].mean())


def embedding_grads(model, seqs: list[torch.Tensor], targets: list[torch.Tensor], compute: Compute) -> torch.Tensor:
    """d(sum over sequences of mean target NLL) / d(input embeddings): [B, T, d], right-padded."""
    ids, mask = _pad(seqs)
    labels = torch.full_like(ids, -100)
    for r, (s, tgt) in enumerate(zip(seqs, targets)):
        labels[r, :len(s)] = torch.where(tgt, s, torch.full_like(s, -100))
    ids, mask, labels = ids.to(compute.device), mask.to(compute.device), labels.to(compute.device)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with compute.autocast():
        logits = model(inputs_embeds=emb, attention_mask=mask).logits
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none",
                          ignore_index=-100)
    per_seq = nll.sum(1) / (labels[:, 1:] != -100).sum(1).clamp(min=1)
    (grad,) = torch.autograd.grad(per_seq.sum(), emb)
    return grad.float()


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
