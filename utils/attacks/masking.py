"""Checks for gradient masking by the monotone activation (Athalye et al. 2018).

The monotone GELU is gelu(max(x, x*)) with x* ~ -0.7518: its derivative is exactly 0 below the
clamp, and only the constrained arms have it. A gradient-guided search (HotFlip, UAT, GCG) that
ranks swaps by first-order scores is blind wherever the pre-activations lie in that flat region,
so a constrained arm could look robust without being so. Two checks live here:

  flat_fractions        how much of the MLP's input lies in the flat region, per layer, on given
                        texts (0 for an arm without the clamp)
  exact_gelu_backward   BPDA (Athalye et al.'s backward-pass differentiable approximation): the
                        forward pass stays the monotone model's, bit for bit; the backward pass
                        uses the derivative of exact GELU at the unclamped input, which is not 0
                        below the clamp. Any gradient-guided search can run under it
                        (attack.surrogate_gradient=exact_gelu); stage 6's gcg_surrogate does.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from configs.experiment_config import SURROGATE_GRADIENTS
from utils.model.portable.modeling_monotone import GELU_ARGMIN, MonotoneGELU


def monotone_activations(model) -> list[MonotoneGELU]:
    return [m for m in model.modules() if isinstance(m, MonotoneGELU)]


def has_flat_region(model) -> bool:
    """True for a model whose MLPs use the clamped (monotone) GELU."""
    return bool(monotone_activations(model))


class _ExactGeluBackward(torch.autograd.Function):
    """Forward: the monotone GELU. Backward: d gelu(x) / dx at the unclamped x = Phi(x) + x phi(x), by
    torch's own GELU backward kernel (so above the clamp it is the plain gradient, bit for bit)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.gelu(torch.clamp(x, min=GELU_ARGMIN))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad, x)


@contextmanager
def exact_gelu_backward(model):
    """Every monotone activation of `model` computes its usual forward value and the exact-GELU gradient."""
    acts = monotone_activations(model)
    for act in acts:
        act.forward = _ExactGeluBackward.apply
    try:
        yield
    finally:
        for act in acts:
            del act.forward          # back to the class's forward


@contextmanager
def surrogate(model, name: str):
    """attack.surrogate_gradient: 'none' (the model's own gradient) or 'exact_gelu' (BPDA above)."""
    if name == "none":
        yield
    elif name == "exact_gelu":
        with exact_gelu_backward(model):
            yield
    else:
        raise ValueError(f"unknown surrogate gradient {name!r}; one of {SURROGATE_GRADIENTS}")


@torch.no_grad()
def flat_fractions(model, seqs: list[torch.Tensor], device, batch_size: int = 32) -> dict:
    """Per layer, the fraction of MLP pre-activations (the activation's inputs) below the clamp x*, over
    every position of `seqs`. Measured on every arm: `flat_region` says whether the gradient is 0 there
    (the clamped GELU) or only small (exact GELU, an unconstrained arm)."""
    acts = [m for name, m in model.named_modules() if name.endswith("mlp.act")]
    below, total = [0] * len(acts), [0] * len(acts)

    def counter(i):
        def hook(_module, inputs):
            below[i] += int((inputs[0] < GELU_ARGMIN).sum())
            total[i] += inputs[0].numel()
        return hook

    handles = [a.register_forward_pre_hook(counter(i)) for i, a in enumerate(acts)]
    by_length: dict[int, list[torch.Tensor]] = {}
    for s in seqs:                     # equal lengths per batch: no padding, every position is a real token
        by_length.setdefault(len(s), []).append(s)
    try:
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                model(input_ids=torch.stack(group[start:start + batch_size]).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    per_layer = [b / t if t else 0.0 for b, t in zip(below, total)]
    return {"flat_region": has_flat_region(model), "fraction_below_clamp": per_layer,
            "mean": sum(per_layer) / len(per_layer) if per_layer else None, "inputs_per_layer": total[0] if total else 0}
