"""Next-token NLL without [batch, length, vocab] logits: the one loss routine of training,
validation, perplexity and the attacks.

A causal LM's full logits are the largest tensor of a step: for Pythia's 50,304 tokens at
8 x 2048 positions they are 1.6 GiB in bf16, plus a float32 copy, plus the log-softmax
autograd keeps, several GiB more. Here the vocabulary projection runs only on the target
rows, LOGIT_ROWS at a time, in float32 per chunk; with gradients each chunk is
recomputed in backward (activation checkpointing), so one chunk's logits exist at a time.

The model still runs its own forward (with logits_to_keep=1: a [batch, 1, vocab] head
output, discarded): under FSDP2 the root unit gathers the output embedding in that
forward and hooks its backward on the outputs, which include the final hidden states
used here when there is a backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Target rows per vocabulary projection: LOGIT_ROWS x vocab float32 logits (~200 MB for Pythia).
LOGIT_ROWS = 1024


def final_hidden(model, input_ids=None, attention_mask=None, inputs_embeds=None, cache=None) -> torch.Tensor:
    """[batch, length, d] hidden states after the final norm (what the output embedding reads).

    With gradients they come as an output of the forward (output_hidden_states: every layer's output
    is saved for backward anyway), so that FSDP hooks its backward on them; without, a hook takes the
    last alone (the tuple of every layer's output would hold them all until the loss is computed).
    `cache`: a transformers Cache of the preceding positions' keys and values (input_ids continue
    them); the model appends this call's to it."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                  logits_to_keep=1, use_cache=cache is not None, past_key_values=cache)
    if torch.is_grad_enabled():
        return model(**kwargs, output_hidden_states=True).hidden_states[-1]
    captured = []
    hook = model.base_model.register_forward_hook(lambda m, args, out: captured.append(out.last_hidden_state))
    try:
        model(**kwargs)
    finally:
        hook.remove()
    return captured[0]


def _chunk_nll(weight, bias, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(rows, weight, bias)
    return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), labels, reduction="none")


def target_nll(model, hidden: torch.Tensor, labels: torch.Tensor, every: bool = False) -> torch.Tensor:
    """NLL of every position whose label is not -100, in row-major order (a 1-D float32 tensor);
    `every`: all positions are targets (training windows), no mask to apply.

    `hidden[b, t]` predicts `labels[b, t]` (shift before calling). The output embedding is applied
    as a function of its weight, not called as a module: module hooks (FSDP's, memory trackers')
    expect one call per forward, this makes one per chunk."""
    if every:
        rows, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    else:
        keep = labels != -100
        rows, targets = hidden[keep], labels[keep]
    if not len(rows):
        return rows.new_zeros(0, dtype=torch.float32)
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    grad = torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad)
    parts = [checkpoint(_chunk_nll, weight, bias, h, y, use_reentrant=False) if grad else _chunk_nll(weight, bias, h, y)
             for h, y in zip(rows.split(LOGIT_ROWS), targets.split(LOGIT_ROWS))]
    return torch.cat(parts)


def row_sums(nll: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row of `labels`, the sum of `target_nll`'s values that belong to it."""
    rows = (labels != -100).nonzero()[:, 0]
    return torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)


def token_nll(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Per-position NLL [batch, length - 1] of labels[:, 1:] given input_ids (0 where the label is -100)."""
    hidden = final_hidden(model, input_ids, attention_mask)[:, :-1]
    shifted = labels[:, 1:]
    out = torch.zeros(shifted.shape, dtype=torch.float32, device=hidden.device)
    return out.masked_scatter(shifted != -100, target_nll(model, hidden, shifted))
