"""Monotone MLP sublayers for GPT-NeoX, and the certificate that checks them.

N(h) = W2 act(W1 h + b1) + b2 is non-decreasing in every coordinate of h when
act is non-decreasing (utils.model.activations) and, per hidden unit k, row k of W1 and
column k of W2 share one sign s_k (s_k W1[k,:] >= 0, s_k W2[:,k] >= 0: the two
signs cancel). Three constructions keep that true during training:
  softplus_abs  W = softplus(V), all s_k = +1 (the paper's; every unit convex for a convex act)
  signed_units  W1[k,:] = s_k softplus(V1[k,:]), W2[:,k] = s_k softplus(V2[:,k]), s_k fixed at
                initialisation to keep the larger pretrained weight mass (units with s_k = -1 are
                concave, lifting the convexity restriction; Runje and Shankaranarayana, ICML 2023)
  projected     W trained directly and clamped to >= 0 after every optimizer step
Initialisation from the pretrained W: `abs` puts s_k W at |W| (the paper's), `clip` at max(s_k W, 0)
(the Euclidean projection); the softplus constructions add init_eps (softplus(V) > 0).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from utils.model.activations import MonotoneGELU, is_non_decreasing

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


def _has_values(t: torch.Tensor) -> bool:
    """False for tensors without data: the meta device (a model skeleton), fake tensors (memory estimates)."""
    from torch._subclasses.fake_tensor import is_fake
    return t.device.type != "meta" and not is_fake(t)


def _inverse_softplus(w: torch.Tensor) -> torch.Tensor:
    if _has_values(w) and not bool((w > 0).all()):
        raise ValueError("softplus parametrisation needs strictly positive weights; initialise with |W| + eps first")
    return w + torch.log(-torch.expm1(-w))   # log(exp(w) - 1), stable for small and large w


class SoftplusWeight(nn.Module):
    """W = softplus(V) >= 0. right_inverse is the exact inverse on W > 0."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return F.softplus(v)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return _inverse_softplus(w)


class SignedSoftplusWeight(nn.Module):
    """W = s * softplus(V), one fixed sign per hidden unit: s indexes dim 0 of W1 [4h, h], dim 1 of W2 [h, 4h]."""

    def __init__(self, signs: torch.Tensor, unit_dim: int):
        super().__init__()
        self.unit_dim = unit_dim
        self.register_buffer("signs", signs.float().clone())

    def broadcast(self, like: torch.Tensor) -> torch.Tensor:
        return self.signs.to(like.dtype).view((-1, 1) if self.unit_dim == 0 else (1, -1))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return F.softplus(v) * self.broadcast(v)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return _inverse_softplus(w * self.broadcast(w))


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


def resolve_init(construction: str, init: str) -> str:
    """`auto` is each construction's own: |W| for the softplus ones (the paper's), max(W, 0) for projected."""
    return ("clip" if construction == "projected" else "abs") if init == "auto" else init


def mlp_pairs(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    return [(layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h) for layer in model.gpt_neox.layers]


def majority_signs(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """s_k = +1 where row k of W1 and column k of W2 hold at least as much positive as negative mass."""
    positive = w1.clamp(min=0).sum(1) + w2.clamp(min=0).sum(0)
    negative = (-w1).clamp(min=0).sum(1) + (-w2).clamp(min=0).sum(0)
    return torch.where(positive >= negative, 1.0, -1.0)


def unit_signs(w1_module: nn.Linear) -> torch.Tensor | None:
    """The per-unit signs a signed_units W1 carries, or None (every sign +1)."""
    if parametrize.is_parametrized(w1_module, "weight"):
        p = w1_module.parametrizations.weight[0]
        if isinstance(p, SignedSoftplusWeight):
            return p.signs
    return None


def _register(model: nn.Module, spec: dict) -> None:
    """Put the construction's parametrisation on the constrained modules, whose `.weight` holds W."""
    construction = spec.get("construction", "softplus_abs")      # models saved before constructions existed
    if construction == "projected":
        return                                                   # plain weights, clamped by the training loop
    if construction == "softplus_abs":
        for mod in constrained_modules(model, spec["scope"]).values():
            parametrize.register_parametrization(mod, "weight", SoftplusWeight())
        return
    for w1, w2 in mlp_pairs(model):
        # Every entry of a unit shares its sign, so the sign of the unit's sum recovers s_k from saved weights.
        signs = torch.where(w1.weight.detach().sum(1) + w2.weight.detach().sum(0) >= 0, 1.0, -1.0)
        parametrize.register_parametrization(w1, "weight", SignedSoftplusWeight(signs, 0))
        parametrize.register_parametrization(w2, "weight", SignedSoftplusWeight(signs, 1))


def apply_monotonicity(model: nn.Module, scope: str, activation: str, init_eps: float,
                       construction: str = "softplus_abs", init: str = "auto") -> list[str]:
    """Constrain `model` in place; returns the names of the constrained modules."""
    if construction == "signed_units" and scope != "mlp_both":
        raise ValueError("signed_units constrains both MLP matrices: it needs scope mlp_both")
    if activation == "monotone":
        if model.config.hidden_act != "gelu":
            raise ValueError(f"activation=monotone replaces exact GELU; this model uses {model.config.hidden_act!r}")
        model.config.hidden_act = "monotone_gelu"
        for layer in model.gpt_neox.layers:
            layer.mlp.act = MonotoneGELU()
    init = resolve_init(construction, init)
    mods = constrained_modules(model, scope)
    signs = {}                                  # module -> its unit signs, broadcast to the weight's shape
    if construction == "signed_units":
        for w1, w2 in mlp_pairs(model):
            s = majority_signs(w1.weight.detach(), w2.weight.detach())
            signs[w1], signs[w2] = s.view(-1, 1), s.view(1, -1)
    eps = 0.0 if construction == "projected" else init_eps
    with torch.no_grad():
        for mod in mods.values():
            s = signs.get(mod, 1.0)
            magnitude = mod.weight * s         # sign information is lost: recovery training follows
            magnitude = magnitude.abs() if init == "abs" else magnitude.clamp(min=0)
            mod.weight.copy_((magnitude + eps) * s)
    spec = {"scope": scope, "activation": activation, "init_eps": init_eps, "construction": construction,
            "init": init}
    _register(model, spec)
    model.config.monotone = spec             # saved into config.json, so load_model re-parametrises
    return sorted(mods)


def reparametrize_loaded(model: nn.Module) -> nn.Module:
    """Re-register the construction's parametrisation on a model loaded from materialised weights."""
    spec = getattr(model.config, "monotone", None)
    if spec:
        _register(model, spec)
    return model


def release_constraint(model: nn.Module) -> nn.Module:
    """The same function without its weight constraint: W is materialised into plain weights that
    training may move anywhere, and the model is no longer re-parametrised on loading. The activation
    stays (the starting function is unchanged). The unconstrained_from_init control starts from this."""
    for mod in model.modules():
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    if getattr(model.config, "monotone", None):
        model.config.released_constraint = model.config.monotone
        model.config.monotone = None
    return model


def project_constrained_(model: nn.Module) -> None:
    """The projected construction's half of each optimizer step: W <- max(W, 0). A no-op otherwise."""
    spec = getattr(getattr(model, "config", None), "monotone", None)
    if spec and spec.get("construction") == "projected":
        with torch.no_grad():
            for mod in constrained_modules(model, spec["scope"]).values():
                mod.weight.clamp_(min=0)


def cache_fits(model: nn.Module, free_bytes: int | None = None) -> bool:
    """Whether every constrained W = softplus(V) may stay alive across forwards: twice their bytes fit the room
    left on the device (a GPU's free memory and what PyTorch holds reserved but unused; on a CPU always;
    `free_bytes` states it). pythia-6.9b's MLP weights are 17.2 GB beside its 27.4 GB: a 40 GB card does not."""
    need = sum(mod.parametrizations.weight.original.numel() * mod.parametrizations.weight.original.element_size()
               for mod in model.modules() if parametrize.is_parametrized(mod, "weight"))
    if free_bytes is None:
        device = next(model.parameters()).device
        free_bytes = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                      - torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    return bool(need) and (free_bytes is None or 2 * need < free_bytes)


def constrained_cache(model: nn.Module, free_bytes: int | None = None, fits: bool | None = None):
    """`parametrize.cached()` (softplus(V) once for every forward inside it) where `cache_fits` (or `fits`, decided
    once by a caller on a hot path), else a no-op context (each layer's W computed as the layer runs, and freed
    after it): the same numbers either way."""
    return parametrize.cached() if (cache_fits(model, free_bytes) if fits is None else fits) else nullcontext()


# -- certificate ---------------------------------------------------------------

def capture_mlp_inputs(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The real inputs each layer's MLP sees on `input_ids`, flattened to [tokens, d]."""
    captured, hooks = [], []
    for layer in model.gpt_neox.layers:
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, args, out: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
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
    tensor itself), never by skipping names (trap 3). Each weight is checked
    with its unit's sign: s_k W1[k,:] >= 0 and s_k W2[:,k] >= 0, s_k taken from
    W1 alone (signed_units; +1 for the other constructions), so a W2 whose
    signs disagree with W1's fails. min_weight is the smallest s_k W.
    """
    gen = torch.Generator().manual_seed(seed)
    real_inputs = capture_mlp_inputs(model, input_ids) if input_ids is not None else None
    constrained = constrained_modules(model, scope)
    layers = []
    for i, layer in enumerate(model.gpt_neox.layers):
        mods = {n: m for n, m in constrained.items() if n.startswith(f"gpt_neox.layers.{i}.")}
        signs = unit_signs(layer.mlp.dense_h_to_4h)
        broadcast = {} if signs is None else {layer.mlp.dense_h_to_4h: signs.view(-1, 1),
                                              layer.mlp.dense_4h_to_h: signs.view(1, -1)}
        weights = []
        for name, mod in sorted(mods.items()):
            w = mod.weight.detach()
            w = w * broadcast[mod].to(w.dtype) if mod in broadcast else w
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
            "layer": i, "weights": weights, "concave_units": 0 if signs is None else int((signs < 0).sum()),
            "activation": type(mlp.act).__name__,
            "activation_non_decreasing": act_ok, "property_test_comparisons": total,
            "violations": violations, "most_negative_change": worst,
            "monotone": act_ok and violations == 0 and all(w["min_weight"] >= 0 for w in weights),
        })
    spec = getattr(model.config, "monotone", None) or {}
    return {
        "scope": scope, "claim": SCOPE_CLAIMS[scope], "construction": spec.get("construction"), "init": spec.get("init"),
        "min_weight": min(w["min_weight"] for l in layers for w in l["weights"]),
        "total_violations": sum(l["violations"] for l in layers),
        "monotone": all(l["monotone"] for l in layers),
        "layers": layers,
    }
