"""How far recovery training moved the weights, by module group: whether a constraint froze them (trap 2) and
whether recovery moved the constrained MLPs or got around them through attention and embeddings; and the ablation
that trains the constrained modules alone."""
from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from utils.model.monotonicity import SoftplusWeight, constrained_modules

MLP_IN = ("dense_h_to_4h", "up_proj", "gate_proj", "c_fc", "fc1")     # GPT-NeoX, Llama, GPT-2, OPT names
GROUPS = ("mlp_in", "mlp_out", "attention", "embeddings", "norms", "other")


def module_group(name: str, module: torch.nn.Module, output_embeddings: torch.nn.Module) -> str:
    """Which part of a transformer a module with weights belongs to."""
    parts = name.split(".")
    if isinstance(module, torch.nn.Embedding) or module is output_embeddings:
        return "embeddings"
    if "norm" in type(module).__name__.lower():
        return "norms"
    if "mlp" in parts:
        return "mlp_in" if parts[-1] in MLP_IN else "mlp_out"
    if {"attention", "self_attn", "attn"} & set(parts):
        return "attention"
    return "other"


def released_modules(trained) -> set[str]:
    """The modules whose softplus constraint was released (unconstrained_from_init, the ladder): training started
    from the W their parametrisation gave on loading, not from the saved W bit for bit."""
    spec = getattr(trained.config, "released_constraint", None)
    if not spec or spec.get("construction") == "projected":
        return set()
    return set(constrained_modules(trained, spec["scope"]))


def start_weight(start, name: str, mod: torch.nn.Module, t: str = "weight",
                 released: set[str] = frozenset()) -> torch.Tensor:
    """The start's effective tensor `t` of module `name` as training had it at step 0, in fp32 on the CPU.
    `start` maps the model's names to the saved tensors (utils.model.modeling.SavedWeights: read one at a time).
    A parametrised module's W went through its parametrisation on loading: W0 = f(f^-1(W saved)), V0 = f^-1(W
    saved); a released one's too, before the release: sign(W) softplus(softplus^-1(|W|)) (every entry of a signed
    unit carries its sign)."""
    w = start[f"{name}.{t}"].float()
    if t == "weight" and parametrize.is_parametrized(mod, "weight"):
        f = mod.parametrizations.weight[0]
        w = f(f.right_inverse(w.to(mod.parametrizations.weight.original.device)))
    elif t == "weight" and name in released:
        f = SoftplusWeight()
        w = w.sign() * f(f.right_inverse(w.abs()))
    return w.cpu()


@torch.no_grad()
def weight_change_by_group(start, trained) -> dict:
    """Relative change sum |W1 - W0| / sum |W0| of the effective weights and biases, per module group:
    whether recovery moved the (constrained) MLPs or got around them through attention and embeddings."""
    sums = {}
    out_emb = trained.get_output_embeddings()
    released = released_modules(trained)
    for name, mod in trained.named_modules():
        tensors = [t for t in ("weight", "bias") if isinstance(getattr(mod, t, None), torch.Tensor)]
        if not tensors:
            continue
        acc = sums.setdefault(module_group(name, mod, out_emb), [0.0, 0.0, 0])
        for t in tensors:
            w0, w1 = start_weight(start, name, mod, t, released), getattr(mod, t).float().cpu()
            acc[0] += float((w1 - w0).abs().sum())
            acc[1] += float(w0.abs().sum())
            acc[2] += w0.numel()
    return {g: {"relative_delta": d / m if m else None, "mean_abs_delta": d / n, "parameters": n}
            for g in GROUPS if g in sums for d, m, n in [sums[g]]}


def freeze_all_but_constrained(model, scope: str) -> int:
    """The ablation recipe.trainable = constrained: only the scope's modules (the monotone MLPs: their
    pre-parameters V and biases) train, so the question is whether they themselves recover.
    Returns the number of trainable parameters."""
    model.requires_grad_(False)
    for module in constrained_modules(model, scope).values():
        module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def movement_report(start, trained, scope: str) -> dict:
    """How far training moved the weights: a frozen constraint shows up here (trap 2).

    `start` maps names to the start's saved tensors (start_weight); `constrained` are the scope's modules
    (free in the baseline, for comparison); for parametrised ones the fraction of pre-parameters V that changed.
    """
    trained_mods = constrained_modules(trained, scope)
    out = {"scope_modules": len(trained_mods)}
    changed = total = 0
    for name, mod in trained_mods.items():
        if parametrize.is_parametrized(mod, "weight"):
            v1 = mod.parametrizations.weight.original
            v0 = mod.parametrizations.weight[0].right_inverse(start[f"{name}.weight"].to(v1.device, v1.dtype))
            changed += int((v0 != v1).sum())
            total += v1.numel()
    out["fraction_V_changed"] = changed / total if total else None
    # Effective weights W of every Linear and Embedding: sum |dW|, count, sum |W0|.
    sums = {"constrained": [0.0, 0, 0.0], "unconstrained": [0.0, 0, 0.0]}
    released = released_modules(trained)
    for name, mod in trained.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            w0 = start_weight(start, name, mod, released=released)
            w1 = mod.weight.float().cpu()
            acc = sums["constrained" if name in trained_mods else "unconstrained"]
            acc[0] += float((w1 - w0).abs().sum())
            acc[1] += w0.numel()
            acc[2] += float(w0.abs().sum())
    for group, (delta, n, mass) in sums.items():
        out[f"mean_abs_delta_W_{group}"] = delta / n
        out[f"relative_delta_W_{group}"] = delta / mass
    out["groups"] = weight_change_by_group(start, trained)
    return out
