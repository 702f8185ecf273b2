"""PGD on the input embeddings (Madry et al. 2018): a continuous probe of sensitivity near the text.

Composition:
  goal            raise the mean next-token NLL of the text tokens (the same loss as HotFlip's, on
                  every text token: nothing is swapped, the labels stay the text)
  transformation  add delta_t to the input embedding of every text position t (EOS excluded)
  constraints     ||delta_t||_2 <= radius * mean embedding norm, per position; radii given as
                  fractions (attack.pgd_radii)
  search          pgd_steps steps of normalised-gradient ascent from delta = 0, step 2.5 radius /
                  steps per position, each followed by the projection onto the balls; the result is
                  the best exact objective of any iterate (the loss of an iterate comes with its
                  gradient pass), rescored with a fresh forward pass

Discrete searches move only between token embeddings; this one moves anywhere in a small ball
around them, where a monotone MLP's ordering of its inputs should matter most. What it finds is a
lower bound on the worst damage inside the ball (a local search need not find the maximum), not a
bound on what any input change can do; and a ball of 0.2 x the mean embedding norm holds no other
token's embedding, so it says nothing of token swaps. Deterministic: no random start.
"""
from __future__ import annotations

import torch

from configs.experiment_config import AttackConfig
from utils.attacks.core import Trace, Victim, target_mask


def composition(a: AttackConfig) -> dict:
    return {"attack": "PGD on input embeddings (Madry et al. 2018), L2 ball per position",
            "goal": "maximise the mean next-token NLL of the text tokens",
            "transformation": "add a perturbation to every text position's input embedding (EOS excluded)",
            "constraints": f"||delta_t|| <= r x mean embedding norm, r in {a.pgd_radii}",
            "search": f"{a.pgd_steps} normalised-gradient steps of 2.5 r / steps from 0, projected; best iterate, "
                      f"rescored exactly"}


def mean_embedding_norm(victim: Victim, forbidden: torch.Tensor) -> float:
    """The mean L2 norm of the allowed tokens' input embeddings: the unit of the radii."""
    return float(victim.embeddings[~forbidden.to(victim.embeddings.device)].float().norm(dim=1).mean())


def nearest_swap_distance(victim: Victim, forbidden: torch.Tensor, sample: int = 1024) -> float:
    """The median, over a fixed sample of allowed tokens, of the L2 distance from a token's input embedding to
    the nearest other allowed token's: the smallest change a token swap makes at a position, the unit that puts
    PGD's radii beside the discrete attacks' threat model (a ball of radius below it holds no swap of the median
    token)."""
    emb = victim.embeddings[~forbidden.to(victim.embeddings.device)].float()
    picked = torch.randperm(len(emb), generator=torch.Generator().manual_seed(0))[:sample].to(emb.device)
    dist = torch.cdist(emb[picked], emb)                              # [sample, allowed]
    dist[torch.arange(len(picked), device=emb.device), picked] = float("inf")      # not the token itself
    return float(dist.min(dim=1).values.median())


def _project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norms = delta.norm(dim=-1, keepdim=True)
    return delta * torch.clamp(eps / norms.clamp(min=1e-12), max=1.0)


def attack_text(victim: Victim, ids: torch.Tensor, radius: float, unit: float, steps: int) -> tuple[dict, torch.Tensor]:
    """(record, best delta [len, d]) for one text at one radius (a fraction of `unit`)."""
    before = victim.cost.copy()
    trace = Trace(victim, before, count="gradient_passes")
    eps, targets = radius * unit, target_mask(len(ids))
    alpha = 2.5 * eps / steps
    (clean, _), = victim.perturbed([ids], [targets], [torch.zeros(len(ids), victim.embeddings.shape[1])], grad=False)
    delta = torch.zeros(len(ids), victim.embeddings.shape[1])
    best, best_delta = 0.0, delta.clone()
    trace.add(0.0)
    for _ in range(steps + 1):           # the last pass only scores the last step's iterate
        (loss, grad), = victim.perturbed([ids], [targets], [delta], grad=True)
        if loss - clean > best:
            best, best_delta = loss - clean, delta.clone()
        trace.add(best)
        grad[0] = 0                       # EOS is not perturbed
        step = grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        delta = _project(delta + alpha * step, eps)
        delta[0] = 0
    (attacked, _), = victim.perturbed([ids], [targets], [best_delta], grad=False)
    return ({"radius": radius, "epsilon": eps, "clean_nll": clean, "attacked_nll": attacked,
             "abs_delta_nll": attacked - clean, "rel_delta_nll": attacked / clean - 1,
             "max_delta_norm": float(best_delta.norm(dim=-1).max()), "cost": victim.cost.since(before),
             "trace": trace.points}, best_delta)
