"""HotFlip (Ebrahimi et al. 2018) for language modelling, and its random-flip control.

Composition:
  goal            raise the mean next-token NLL over the tokens the attacker did
                  not modify, relative to the clean text on the same positions;
                  success = relative increase above a threshold (default 15%),
                  the absolute increase is reported beside it (trap 9)
  transformation  replace one text token by any non-special token
  constraints     at most K flips per text, each position flipped at most once,
                  EOS (position 0) never flipped
  search          beam search over flips: first-order scores (e_b - e_a) . grad
                  propose the top-k (position, token) pairs per beam item, each
                  checked with an exact forward pass; a flip is kept only if the
                  exact objective rises; re-linearised after every accepted flip
"""
from __future__ import annotations

import torch

from configs.experiment_config import AttackConfig
from utils.attacks.core import Trace, Victim, flip_scores, masked_mean, target_mask

COMPOSITION = {
    "attack": "HotFlip (Ebrahimi et al. 2018)",
    "goal": "maximise NLL(adversarial) - NLL(clean) over unmodified target tokens; "
            "success = relative increase > threshold",
    "transformation": "swap one text token for any non-special vocabulary token",
    "constraints": "at most max_flips flips, each position once, EOS never flipped; "
                   "flipped tokens are never scored as targets",
    "search": "beam search; first-order top-k (position, token) proposals; exact batched re-check; "
              "a flip is kept only if the exact objective rises; gradient recomputed after each flip",
}


def score(adv_nll: torch.Tensor, clean_nll: torch.Tensor, length: int, modified) -> dict:
    """Clean and attacked mean NLL over the same targets, and the damage."""
    mask = target_mask(length, modified)
    clean, attacked = masked_mean(clean_nll, mask), masked_mean(adv_nll, mask)
    return {"clean_nll": clean, "attacked_nll": attacked, "abs_delta_nll": attacked - clean,
            "rel_delta_nll": attacked / clean - 1}


def record(victim: Victim, ids: torch.Tensor, adv: torch.Tensor, clean_nll: torch.Tensor, before,
           trace: Trace) -> dict:
    """The per-text record every attack under this threat model writes (HotFlip, GCG, random search):
    the final pair rescored with one exact forward pass, what the search cost, and its convergence
    trace [[forward passes, best exact objective so far], ...]."""
    modified = (adv != ids).nonzero().squeeze(1).tolist()
    adv_nll = victim.nll([adv], [target_mask(len(adv), modified)])[0]
    return {"original_ids": ids.tolist(), "adversarial_ids": adv.tolist(), "modified_positions": modified,
            "n_flips": len(modified), **score(adv_nll, clean_nll, len(adv), modified),
            "cost": victim.cost.since(before), "trace": trace.points}


def attack_text(victim: Victim, ids: torch.Tensor, a: AttackConfig, forbidden: torch.Tensor) -> dict:
    before = victim.cost.copy()
    trace = Trace(victim, before)
    clean_nll = victim.nll([ids])[0]
    beam = [(ids, frozenset(), 0.0)]        # (ids, modified positions, objective)
    best = beam[0]
    trace.add(best[2])
    for _ in range(a.hotflip_max_flips):
        groups = []                                 # per beam item: (it, its candidate flips)
        for cur, modified, parent_obj in beam:
            free = torch.tensor([p for p in range(1, len(cur)) if p not in modified])
            if len(free) == 0:
                continue
            grad = victim.grads([cur], [target_mask(len(cur), modified)])[0].to(victim.embeddings.device)
            scores = flip_scores(grad[free], cur[free].to(grad.device), victim.embeddings,
                                 forbidden.to(grad.device))
            top = scores.flatten().topk(min(a.hotflip_top_k, scores.numel())).indices.cpu()
            groups.append((cur, []))
            for flat in top:
                pos, tok = int(free[flat // scores.shape[1]]), int(flat % scores.shape[1])
                new = cur.clone()
                new[pos] = tok
                groups[-1][1].append((new, modified | {pos}, parent_obj))
        if not groups:
            break
        candidates = [c for _, group in groups for c in group]
        nlls = [nll for cur, group in groups        # a beam item's flips are scored over its prefix
                for nll in victim.nll([c[0] for c in group], [target_mask(len(c[0]), c[1]) for c in group], base=cur)]
        accepted = {}
        for (new, modified, parent_obj), nll in zip(candidates, nlls):
            obj = score(nll, clean_nll, len(new), modified)["abs_delta_nll"]
            if obj > parent_obj:                      # keep a flip only if the exact loss rises
                accepted.setdefault(tuple(new.tolist()), (new, modified, obj))
        if not accepted:
            trace.add(best[2])          # the passes of the last, fruitless round count too
            break
        beam = sorted(accepted.values(), key=lambda c: -c[2])[:a.hotflip_beam]
        if beam[0][2] > best[2]:
            best = beam[0]
        trace.add(best[2])
    return record(victim, ids, best[0], clean_nll, before, trace)


def random_flips(ids: torch.Tensor, n_flips: int, forbidden: torch.Tensor, gen: torch.Generator) -> dict:
    """Control: the same number of flips at random positions to random allowed tokens (scored by `rescore`)."""
    allowed = (~forbidden).nonzero().squeeze(1)
    positions = (torch.randperm(len(ids) - 1, generator=gen)[:n_flips] + 1).tolist()
    adv = ids.clone()
    for p in positions:
        tok = adv[p]
        while tok == adv[p]:
            tok = allowed[torch.randint(len(allowed), (1,), generator=gen)].item()
        adv[p] = tok
    return {"original_ids": ids.tolist(), "adversarial_ids": adv.tolist(), "modified_positions": sorted(positions)}


def rescore(victim: Victim, pairs: list[dict]) -> list[dict]:
    """Damage of stored (original_ids, adversarial_ids, modified_positions) pairs on the victim (transfer,
    controls, recomputation), in one batched query: sequences sorted by length, so a batch needs no padding
    where the lengths allow."""
    seqs, masks = [], []
    for p in pairs:
        mask = target_mask(len(p["original_ids"]), p["modified_positions"])
        seqs += [torch.tensor(p["original_ids"]), torch.tensor(p["adversarial_ids"])]
        masks += [mask, mask]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    nlls = [None] * len(seqs)
    for i, nll in zip(order, victim.nll([seqs[i] for i in order], [masks[i] for i in order])):
        nlls[i] = nll
    return [score(nlls[2 * k + 1], nlls[2 * k], len(p["original_ids"]), p["modified_positions"])
            for k, p in enumerate(pairs)]
