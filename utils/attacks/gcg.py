"""Greedy Coordinate Gradient (Zou et al. 2023), under the two threat models of the older attacks.

Composition (text attack; uat.gcg_search runs the same search on UAT's goal and constraints):
  goal            HotFlip's: raise NLL(adversarial) - NLL(clean) over the unmodified target
                  tokens; success = relative increase above attack.success_threshold
  transformation  swap one token for any non-special vocabulary token
  constraints     HotFlip's: at most hotflip_max_flips modified text tokens (once K are
                  modified, only those may change again), EOS never, modified tokens never
                  targets
  search          each step: the gradient w.r.t. the one-hot tokens at every position that
                  may change, its top-k tokens per position (nanoGCG's topk), a batch of
                  search_width random single swaps drawn from them (nanoGCG's n_replace=1),
                  the exact loss of every distinct one, and the best kept. buffer 0
                  (nanoGCG's default): the next step starts from this step's best swap even
                  when it is worse; buffer B: from the best of the B best ever seen. The
                  result is the best exact objective of any step.
`proposal="random"` is the gradient-free control (random search): the same loop, budget and threat
model, with the swaps drawn uniformly from every allowed token at every allowed position instead of
from the gradient's top-k. If it does as well as GCG on an arm, the gradient did not guide GCG there.
Random draws come from a generator seeded by (seed, document): the same text gets the same
search whatever the process or shard.
"""
from __future__ import annotations

import torch

from configs.experiment_config import AttackConfig
from utils.attacks.core import Trace, Victim, flip_scores, masked_mean, target_mask, top_candidates
from utils.attacks.hotflip import record, score


def composition(a: AttackConfig, proposal: str = "gradient", surrogate_gradient: str = "none") -> dict:
    if proposal == "random":
        return {**composition(a), "attack": "random search under HotFlip's threat model (GCG's loop and budget)",
                "search": f"{a.gcg_steps} steps; {a.gcg_search_width} random single swaps per step (uniform over "
                          f"allowed positions and tokens, no gradient), each scored exactly; buffer {a.gcg_buffer}"}
    attack = "GCG (Zou et al. 2023) under HotFlip's threat model"
    if surrogate_gradient != "none":
        attack += f", gradient through the {surrogate_gradient} surrogate (BPDA; the forward pass is the model's)"
    return {"attack": attack,
            "goal": "maximise NLL(adversarial) - NLL(clean) over unmodified target tokens; "
                    "success = relative increase > threshold",
            "transformation": "swap one text token for any non-special vocabulary token",
            "constraints": f"at most {a.hotflip_max_flips} modified tokens, EOS never modified, "
                           f"modified tokens never targets",
            "search": f"{a.gcg_steps} steps; top-{a.gcg_top_k} tokens per position from the one-hot gradient; "
                      f"{a.gcg_search_width} random single swaps per step, each scored exactly; "
                      f"buffer {a.gcg_buffer}"}


def sample_swaps(current: torch.Tensor, positions: torch.Tensor, top: torch.Tensor, width: int,
                 gen: torch.Generator) -> list[torch.Tensor]:
    """Up to `width` distinct copies of `current`, each with one position in `positions` set to one of
    that position's `top` tokens, drawn uniformly (positions, then tokens)."""
    rows = torch.randint(len(positions), (width,), generator=gen)
    cols = torch.randint(top.shape[1], (width,), generator=gen)
    seen, out = set(), []
    for r, c in zip(rows.tolist(), cols.tolist()):
        key = (r, int(top[r, c]))
        if key not in seen:
            seen.add(key)
            cand = current.clone()
            cand[positions[r]] = top[r, c]
            out.append(cand)
    return out


class Buffer:
    """The `size` best (objective, ids) seen; size 0 holds only the last step's best."""

    def __init__(self, size: int, first: torch.Tensor, objective: float):
        self.size, self.items = size, [(objective, first)]

    def add(self, objective: float, ids: torch.Tensor) -> None:
        if self.size == 0:
            self.items = [(objective, ids)]
        else:
            self.items = sorted([*self.items, (objective, ids)], key=lambda x: -x[0])[:self.size]

    def current(self) -> torch.Tensor:
        return self.items[0][1]


def random_swaps(current: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, width: int,
                 gen: torch.Generator) -> list[torch.Tensor]:
    """Up to `width` distinct copies of `current`, each with one position in `positions` set to a token
    drawn uniformly from `allowed` (a draw of the current token is dropped)."""
    rows = torch.randint(len(positions), (width,), generator=gen)
    toks = allowed[torch.randint(len(allowed), (width,), generator=gen)]
    seen, out = set(), []
    for r, t in zip(rows.tolist(), toks.tolist()):
        p = int(positions[r])
        if t != int(current[p]) and (p, t) not in seen:
            seen.add((p, t))
            cand = current.clone()
            cand[p] = t
            out.append(cand)
    return out


def step_best_of(candidates: list[torch.Tensor], objectives: list[float]) -> tuple[float, torch.Tensor]:
    i = max(range(len(candidates)), key=lambda j: objectives[j])
    return objectives[i], candidates[i]


def attack_text(victim: Victim, ids: torch.Tensor, a: AttackConfig, forbidden: torch.Tensor,
                gen: torch.Generator, proposal: str = "gradient") -> dict:
    before = victim.cost.copy()
    trace = Trace(victim, before)
    clean_nll = victim.nll([ids])[0]
    every, allowed = torch.arange(1, len(ids)), (~forbidden).nonzero().squeeze(1)
    buffer, best = Buffer(a.gcg_buffer, ids, 0.0), (0.0, ids)
    trace.add(0.0)
    for _ in range(a.gcg_steps):
        cur = buffer.current()
        modified = (cur != ids).nonzero().squeeze(1)
        positions = modified if len(modified) >= a.hotflip_max_flips else every
        if proposal == "random":
            cands = random_swaps(cur, positions, allowed, a.gcg_search_width, gen)
            if not cands:         # every draw was the current token (a vocabulary of one)
                trace.add(best[0])
                continue
        else:
            grad = victim.grads([cur], [target_mask(len(cur), modified.tolist())])[0]
            top = top_candidates(grad[positions], cur[positions], victim.embeddings, forbidden, a.gcg_top_k)
            cands = sample_swaps(cur, positions, top, a.gcg_search_width, gen)
        changed = [(c != ids).nonzero().squeeze(1).tolist() for c in cands]
        nlls = victim.nll(cands, [target_mask(len(c), m) for c, m in zip(cands, changed)], base=cur)
        objectives = [score(n, clean_nll, len(c), m)["abs_delta_nll"] for c, n, m in zip(cands, nlls, changed)]
        step_best = step_best_of(cands, objectives)
        buffer.add(*step_best)
        if step_best[0] > best[0]:
            best = step_best
        trace.add(best[0])
    return {**record(victim, ids, best[1], clean_nll, before, trace), "steps": a.gcg_steps}


def gradient_fidelity(victim: Victim, ids: torch.Tensor, a: AttackConfig, forbidden: torch.Tensor,
                      gen: torch.Generator) -> dict:
    """Does the model's gradient predict what a swap does? A masking check beyond the clamp: random search's
    first-step proposals (`gen` seeded as its search: search_width single swaps of the clean text, uniform over
    positions and allowed tokens, so no selection by the gradient), each one's first-order gain (e_b - e_a) . grad
    against its exact gain, on the same targets in both (every position but EOS and the swapped ones: a swapped
    token is never a target, so none is): Spearman's rho over the swaps. Near 0 on an arm whose searches it
    guides (GCG, HotFlip), that arm's gradient-guided damage says little. The passes are the check's own (`cost`),
    not the search's."""
    from scipy.stats import spearmanr
    before = victim.cost.copy()
    cands = random_swaps(ids, torch.arange(1, len(ids)), (~forbidden).nonzero().squeeze(1), a.gcg_search_width, gen)
    positions = [int((c != ids).nonzero()) for c in cands]
    targets = target_mask(len(ids), sorted(set(positions)))
    grad = victim.grads([ids], [targets])[0]
    at = torch.tensor(positions)
    scores = flip_scores(grad[at].to(victim.embeddings.device), ids[at].to(victim.embeddings.device),
                         victim.embeddings, forbidden.to(victim.embeddings.device))
    predicted = scores[torch.arange(len(cands)), torch.stack([c[p] for c, p in zip(cands, positions)]).to(scores.device)]
    clean = masked_mean(victim.nll([ids], [targets])[0], targets)
    exact = [masked_mean(n, targets) - clean for n in victim.nll(cands, [targets] * len(cands), base=ids)]
    rho = spearmanr(predicted.cpu().numpy(), exact).statistic if len(cands) > 2 else float("nan")
    return {"spearman": float(rho), "swaps": len(cands), "cost": victim.cost.since(before)}
