"""Monotone MLP sublayers for GPT-NeoX, and the certificate that checks them.

N(h) = W2 act(W1 h + b1) + b2 is non-decreasing in every coordinate of h when
W1 >= 0, W2 >= 0 and act is non-decreasing. Non-negativity comes from the
reparametrisation W = softplus(V) (torch.nn.utils.parametrize), initialised at
softplus(V0) = |W_pretrained| + eps; the activation from utils.activations.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from utils.activations import MonotoneGELU, is_non_decreasing

# Which Linear layers of a GPT-NeoX block each scope constrains.
SCOPE_TARGETS = {
    "mlp_in": ("mlp.dense_h_to_4h",),
    "mlp_both": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "mlp_in_attn_out": ("mlp.dense_h_to_4h", "attention.dense"),
}
# What the scope makes monotone, and so what the certificate tests.
SCOPE_CLAIMS = {
    "mlp_in": "hidden map h -> act(W1 h + b1) of every MLP is non-decreasing",
    "mlp_both": "every MLP sublayer h -> W2 act(W1 h + b1) + b2 is non-decreasing",
    "mlp_in_attn_out": "hidden map h -> act(W1 h + b1) of every MLP is non-decreasing",
}


class SoftplusWeight(nn.Module):
    """W = softplus(V) >= 0. right_inverse is the exact inverse on W > 0."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return F.softplus(v)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        if not bool((w > 0).all()):
            raise ValueError("softplus parametrisation needs strictly positive weights; "
                             "initialise with |W| + eps first")
        return w + torch.log(-torch.expm1(-w))   # log(exp(w) - 1), stable for small and large w


def constrained_modules(model: nn.Module, scope: str) -> dict[str, nn.Linear]:
    if getattr(model.config, "model_type", None) != "gpt_neox":
        raise ValueError(f"monotone scopes are defined for GPT-NeoX models, got {model.config.model_type!r}")
    suffixes = SCOPE_TARGETS[scope]
    found = {name: mod for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and name.endswith(suffixes)}
    expected = len(suffixes) * model.config.num_hidden_layers
    if len(found) != expected:
        raise ValueError(f"scope {scope}: expected {expected} Linear modules, found {len(found)}")
    return found


def _register(model: nn.Module, scope: str) -> None:
    for mod in constrained_modules(model, scope).values():
        parametrize.register_parametrization(mod, "weight", SoftplusWeight())


def apply_monotonicity(model: nn.Module, scope: str, activation: str, init_eps: float) -> list[str]:
    """Constrain `model` in place; returns the names of the constrained modules."""
    if activation == "monotone":
        if model.config.hidden_act != "gelu":
            raise ValueError(f"activation=monotone replaces exact GELU; this model uses {model.config.hidden_act!r}")
        model.config.hidden_act = "monotone_gelu"
        for layer in model.gpt_neox.layers:
            layer.mlp.act = MonotoneGELU()
    mods = constrained_modules(model, scope)
    with torch.no_grad():
        for mod in mods.values():
            mod.weight.abs_().add_(init_eps)   # sign information is lost: recovery training follows
    _register(model, scope)
    # Saved into config.json, so load_model knows to re-parametrise.
    model.config.monotone = {"scope": scope, "activation": activation, "init_eps": init_eps}
    return sorted(mods)


def reparametrize_loaded(model: nn.Module) -> nn.Module:
    """Re-register softplus on a model loaded from materialised weights."""
    spec = getattr(model.config, "monotone", None)
    if spec:
        _register(model, spec["scope"])
    return model


def materialised_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with W = softplus(V) under the plain `.weight` names."""
    out = {}
    for key, tensor in model.state_dict().items():
        if ".parametrizations.weight.original" in key:
            continue
        out[key] = tensor
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            out[f"{name}.weight"] = mod.weight.detach()
    return out


# -- certificate ---------------------------------------------------------------

def capture_mlp_inputs(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The real inputs each layer's MLP sees on `input_ids`, flattened to [tokens, d]."""
    captured, hooks = [], []
    for layer in model.gpt_neox.layers:
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, args, out: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _property_test(fn, x: torch.Tensor, gen: torch.Generator) -> tuple[int, float, int]:
    """Check x <= x' => fn(x) <= fn(x') elementwise on random non-negative steps.

    Returns (violations, most negative change, comparisons). Runs in float64;
    the tolerance only absorbs rounding, a GELU dip is ~1e-2 or more.
    """
    violations, worst, total = 0, 0.0, 0
    with torch.no_grad():
        base = fn(x)
        tol = 1e-9 * (1 + base.abs())
        for scale in (1e-2, 1e-1, 1.0):
            dense = torch.rand(x.shape, generator=gen, dtype=x.dtype) * scale
            sparse = dense * (torch.rand(x.shape, generator=gen, dtype=x.dtype) < 0.1)
            one_hot = torch.zeros_like(x)
            one_hot[torch.arange(x.shape[0]), torch.randint(x.shape[1], (x.shape[0],), generator=gen)] = scale
            for delta in (dense, sparse, one_hot):
                diff = fn(x + delta) - base
                violations += int((diff < -tol).sum())
                worst = min(worst, float(diff.min()))
                total += diff.numel()
    return violations, worst, total


def certify(model: nn.Module, scope: str, *, trials: int, seed: int,
            input_ids: torch.Tensor | None = None) -> dict:
    """Per-layer evidence for the scope's monotonicity claim, and a verdict.

    Weights are read from the materialised `module.weight` (the parametrised
    tensor itself), never by skipping names (trap 3).
    """
    gen = torch.Generator().manual_seed(seed)
    real_inputs = capture_mlp_inputs(model, input_ids) if input_ids is not None else None
    constrained = constrained_modules(model, scope)
    layers = []
    for i, layer in enumerate(model.gpt_neox.layers):
        mods = {n: m for n, m in constrained.items() if n.startswith(f"gpt_neox.layers.{i}.")}
        weights = []
        for name, mod in sorted(mods.items()):
            w = mod.weight.detach()
            weights.append({"module": name, "numel": w.numel(), "min_weight": float(w.min()),
                            "n_negative": int((w < 0).sum()),
                            "parametrized": parametrize.is_parametrized(mod, "weight")})
        mlp = copy.deepcopy(layer.mlp).double().cpu()
        if scope == "mlp_both":
            fn = mlp
        else:
            fn = lambda h, mlp=mlp: mlp.act(mlp.dense_h_to_4h(h))
        # Gaussian inputs at two scales (the larger one reaches GELU's decreasing
        # region even when weights are small), plus the layer's real inputs.
        d_in = mlp.dense_h_to_4h.in_features
        x = torch.cat([torch.randn(trials, d_in, generator=gen, dtype=torch.float64) * s for s in (1.0, 5.0)])
        if real_inputs is not None:
            pool = real_inputs[i].double().cpu()
            pick = torch.randperm(pool.shape[0], generator=gen)[:trials]
            x = torch.cat([x, pool[pick]])
        violations, worst, total = _property_test(fn, x, gen)
        act_ok = is_non_decreasing(mlp.act)
        layers.append({
            "layer": i, "weights": weights, "activation": type(mlp.act).__name__,
            "activation_non_decreasing": act_ok, "property_test_comparisons": total,
            "violations": violations, "most_negative_change": worst,
            "monotone": act_ok and violations == 0 and all(w["min_weight"] >= 0 for w in weights),
        })
    return {
        "scope": scope, "claim": SCOPE_CLAIMS[scope],
        "min_weight": min(w["min_weight"] for l in layers for w in l["weights"]),
        "total_violations": sum(l["violations"] for l in layers),
        "monotone": all(l["monotone"] for l in layers),
        "layers": layers,
    }
