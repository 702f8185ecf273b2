"""Universal Adversarial Triggers (Wallace et al. 2019), for language modelling.

Composition (TextAttack's vocabulary):
  goal            raise the mean next-token NLL of the texts, measured on text
                  tokens only (the trigger is never a target, trap 7)
  transformation  replace one trigger token by any non-special token
  constraints     trigger of fixed length, prepended to every text: [EOS] + trigger + text
  search          per position, top-k candidates from the batch-averaged gradient
                  (first-order (e_b - e_a) . grad), every candidate checked with an
                  exact forward pass on all optimisation texts; left-to-right beam
                  search; sweeps until one brings no gain; random restarts
"""
from __future__ import annotations

import torch

from configs.experiment_config import AttackConfig
from utils.attack_core import embedding_grads, exact_nll, flip_scores, masked_mean, target_mask

COMPOSITION = {
    "attack": "UAT (Wallace et al. 2019)",
    "goal": "maximise mean next-token NLL over text tokens (trigger tokens masked from the loss)",
    "transformation": "swap one trigger token for any non-special vocabulary token",
    "constraints": "fixed trigger length, prepended after EOS; optimised and evaluated on disjoint texts",
    "search": "first-order top-k per position from the batch-averaged gradient, exact batched re-check, "
              "left-to-right beam search, stop after a sweep without gain, random restarts",
}


def triggered(trigger: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[EOS] + trigger + text and its target mask (text tokens only)."""
    ids = torch.cat([text[:1], trigger, text[1:]])
    return ids, target_mask(len(ids), range(1, 1 + len(trigger)))


def text_only(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return text, target_mask(len(text))


def mean_loss(model, trigger, texts, compute, batch_size) -> tuple[float, list[float]]:
    """Mean over texts of each text's mean target NLL with `trigger` prepended (empty = clean)."""
    pairs = [triggered(trigger, t) if len(trigger) else text_only(t) for t in texts]
    nlls = exact_nll(model, [ids for ids, _ in pairs], compute, batch_size)
    per_text = [masked_mean(n, tg) for n, (_, tg) in zip(nlls, pairs)]
    return sum(per_text) / len(per_text), per_text


def _candidate_losses(model, triggers, texts, compute, batch_size) -> list[float]:
    """Exact loss of every candidate trigger on every text, all in shared batches."""
    pairs = [triggered(trig, t) for trig in triggers for t in texts]
    nlls = exact_nll(model, [ids for ids, _ in pairs], compute, batch_size)
    per = [masked_mean(n, tg) for n, (_, tg) in zip(nlls, pairs)]
    k = len(texts)
    return [sum(per[i * k:(i + 1) * k]) / k for i in range(len(triggers))]


def find_trigger(model, texts: list[torch.Tensor], a: AttackConfig, forbidden: torch.Tensor,
                 seed: int, init_token: int, compute) -> dict:
    embeddings = model.get_input_embeddings().weight.detach()
    allowed = (~forbidden).nonzero().squeeze(1)
    best = {"loss": float("-inf")}
    evaluations = 0
    for restart in range(a.uat_restarts):
        gen = torch.Generator().manual_seed(seed * 1000 + restart)
        if restart == 0:       # Wallace et al. start from a repeated common token ("the")
            start = torch.full((a.uat_trigger_len,), init_token, dtype=torch.long)
        else:
            start = allowed[torch.randint(len(allowed), (a.uat_trigger_len,), generator=gen)]
        beam = [(start, _candidate_losses(model, [start], texts, compute, a.batch_size)[0])]
        sweeps = 0
        for sweeps in range(1, a.uat_max_sweeps + 1):
            before = beam[0][1]
            for pos in range(a.uat_trigger_len):
                candidates = []
                for trig, _ in beam:
                    pairs = [triggered(trig, t) for t in texts]
                    grad = embedding_grads(model, [p[0] for p in pairs], [p[1] for p in pairs], compute)
                    g = grad[:, 1 + pos].mean(0, keepdim=True)       # averaged over the texts
                    scores = flip_scores(g, trig[pos:pos + 1].to(g.device), embeddings, forbidden.to(g.device))[0]
                    for tok in scores.topk(a.uat_top_k).indices.cpu():
                        cand = trig.clone()
                        cand[pos] = tok
                        candidates.append(cand)
                losses = _candidate_losses(model, candidates, texts, compute, a.batch_size)
                evaluations += len(candidates) * len(texts)
                pool = {tuple(t.tolist()): (t, l) for t, l in [*beam, *zip(candidates, losses)]}
                beam = sorted(pool.values(), key=lambda x: -x[1])[:a.uat_beam]
            if beam[0][1] <= before + 1e-6:
                break
        if beam[0][1] > best["loss"]:
            best = {"trigger": beam[0][0], "loss": beam[0][1], "restart": restart, "sweeps": sweeps}
    best["exact_evaluations"] = evaluations
    return best
