"""Universal Adversarial Triggers (Wallace et al. 2019), for language modelling.

Composition (TextAttack's vocabulary):
  goal            raise the mean next-token NLL of the texts, measured on text
                  tokens only (the trigger is never a target, trap 7)
  transformation  replace one trigger token by any non-special token
  constraints     trigger of fixed length, prepended to every text: [EOS] + trigger + text
  search          `beam` (Wallace et al.): per position, top-k candidates from the
                  text-averaged gradient (first-order (e_b - e_a) . grad), every
                  candidate checked with exact forward passes; left-to-right beam
                  search; sweeps until one brings no gain; random restarts.
                  `gcg` (Zou et al. 2023): gcg_search below, GCG's search (utils/attacks/gcg.py)
                  on this goal.
  screening       optional, for either search: every candidate on the first
                  uat_screen_texts texts, the best uat_screen_keep of them on all;
                  the search only ever compares exact losses on every text
"""
from __future__ import annotations

import torch

from configs.experiment_config import AttackConfig
from utils.attacks.core import Trace, Victim, masked_mean, target_mask, top_candidates
from utils.attacks.gcg import Buffer, sample_swaps, step_best_of


def composition(a: AttackConfig) -> dict:
    search = ("first-order top-k per position from the text-averaged gradient, exact batched re-check, "
              "left-to-right beam search, stop after a sweep without gain, random restarts") if a.uat_search == "beam" \
        else ("GCG: top-k tokens per position from the text-summed one-hot gradient, a batch of random single "
              "swaps, exact loss of all, keep the best; random restarts")
    screen = (f"every candidate on the first {a.uat_screen_texts} optimisation texts, the best {a.uat_screen_keep} "
              f"on all of them" if a.uat_screen_texts else "none (every candidate on every optimisation text)")
    return {"attack": "UAT (Wallace et al. 2019)" + (" searched with GCG (Zou et al. 2023)" if a.uat_search == "gcg" else ""),
            "goal": "maximise mean next-token NLL over text tokens (trigger tokens masked from the loss)",
            "transformation": "swap one trigger token for any non-special vocabulary token",
            "constraints": "fixed trigger length, prepended after EOS; optimised and evaluated on disjoint texts",
            "search": search, "screening": screen}


def triggered(trigger: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[EOS] + trigger + text and its target mask (text tokens only)."""
    ids = torch.cat([text[:1], trigger, text[1:]])
    return ids, target_mask(len(ids), range(1, 1 + len(trigger)))


def _pairs(trigger: torch.Tensor, texts: list[torch.Tensor]):
    return [triggered(trigger, t) if len(trigger) else (t, target_mask(len(t))) for t in texts]


def per_text_losses(victim: Victim, triggers: list[torch.Tensor], texts: list[torch.Tensor]) -> list[list[float]]:
    """Exact mean target NLL of every text under every trigger (empty trigger = clean), in shared batches."""
    pairs = [p for trig in triggers for p in _pairs(trig, texts)]
    nlls = victim.nll([ids for ids, _ in pairs], [tg for _, tg in pairs])
    per = [masked_mean(n, tg) for n, (_, tg) in zip(nlls, pairs)]
    return [per[i * len(texts):(i + 1) * len(texts)] for i in range(len(triggers))]


def mean_loss(victim: Victim, trigger: torch.Tensor, texts: list[torch.Tensor]) -> tuple[float, list[float]]:
    """Mean over texts of each text's mean target NLL with `trigger` prepended (empty = clean)."""
    per = per_text_losses(victim, [trigger], texts)[0]
    return sum(per) / len(per), per


def trigger_losses(victim: Victim, triggers: list[torch.Tensor], texts: list[torch.Tensor],
                   screen: int = 0, keep: int = 0) -> list[float]:
    """Exact mean loss of each trigger over all texts; with screening, -inf for those not kept."""
    if not screen or len(triggers) <= keep:
        return [sum(p) / len(p) for p in per_text_losses(victim, triggers, texts)]
    head = per_text_losses(victim, triggers, texts[:screen])
    kept = sorted(range(len(triggers)), key=lambda i: -sum(head[i]))[:keep]
    rest = per_text_losses(victim, [triggers[i] for i in kept], texts[screen:])
    out = [float("-inf")] * len(triggers)
    for i, tail in zip(kept, rest):
        out[i] = (sum(head[i]) + sum(tail)) / len(texts)
    return out


def trigger_gradient(victim: Victim, trigger: torch.Tensor, texts: list[torch.Tensor]) -> torch.Tensor:
    """[len(trigger), d]: gradient of the summed per-text losses w.r.t. the trigger embeddings."""
    pairs = _pairs(trigger, texts)
    grads = victim.grads([ids for ids, _ in pairs], [tg for _, tg in pairs])
    return torch.stack([g[1:1 + len(trigger)] for g in grads]).sum(0)


def losses_for(victim: Victim, texts: list[torch.Tensor], a: AttackConfig):
    """The exact objective every UAT search calls: candidate triggers -> mean loss (screened if configured)."""
    return lambda triggers: trigger_losses(victim, triggers, texts, a.uat_screen_texts, a.uat_screen_keep)


def start_trigger(restart: int, length: int, init_token: int, allowed: torch.Tensor, gen: torch.Generator):
    if restart == 0:       # Wallace et al. start from a repeated common token ("the")
        return torch.full((length,), init_token, dtype=torch.long)
    return allowed[torch.randint(len(allowed), (length,), generator=gen)]


def beam_search(victim: Victim, texts, start: torch.Tensor, a: AttackConfig, forbidden: torch.Tensor,
                trace: Trace) -> dict:
    losses = losses_for(victim, texts, a)
    beam = [(start, trigger_losses(victim, [start], texts)[0])]
    trace.add(beam[0][1])
    sweeps = 0
    for sweeps in range(1, a.uat_max_sweeps + 1):
        before = beam[0][1]
        for pos in range(a.uat_trigger_len):
            candidates = []
            for trig, _ in beam:
                grad = trigger_gradient(victim, trig, texts)[pos:pos + 1]
                for tok in top_candidates(grad, trig[pos:pos + 1], victim.embeddings, forbidden, a.uat_top_k)[0]:
                    cand = trig.clone()
                    cand[pos] = tok
                    candidates.append(cand)
            pool = {tuple(t.tolist()): (t, l) for t, l in [*beam, *zip(candidates, losses(candidates))]}
            beam = sorted(pool.values(), key=lambda x: -x[1])[:a.uat_beam]
        trace.add(beam[0][1])
        if beam[0][1] <= before + 1e-6:
            break
    return {"trigger": beam[0][0], "loss": beam[0][1], "iterations": sweeps}


def gcg_search(victim: Victim, texts: list[torch.Tensor], start: torch.Tensor, a: AttackConfig,
               forbidden: torch.Tensor, gen: torch.Generator, trace: Trace) -> dict:
    """UAT's goal and constraints (a universal trigger before every text), searched with GCG."""
    losses = losses_for(victim, texts, a)
    first = trigger_losses(victim, [start], texts)[0]
    buffer, best = Buffer(a.gcg_buffer, start, first), (first, start)
    trace.add(first)
    every = torch.arange(len(start))
    for _ in range(a.gcg_steps):
        cur = buffer.current()
        top = top_candidates(trigger_gradient(victim, cur, texts), cur, victim.embeddings, forbidden, a.gcg_top_k)
        cands = sample_swaps(cur, every, top, a.gcg_search_width, gen)
        step_best = step_best_of(cands, losses(cands))
        buffer.add(*step_best)
        if step_best[0] > best[0]:
            best = step_best
        trace.add(best[0])
    return {"trigger": best[1], "loss": best[0], "iterations": a.gcg_steps}


def find_trigger(victim: Victim, texts: list[torch.Tensor], a: AttackConfig, forbidden: torch.Tensor,
                 seed: int, init_token: int, kept: dict | None = None, after=None) -> dict:
    """The best trigger over `uat_restarts` searches, with the exact cost of all of them, and every
    restart's trigger, cost and trace (best optimisation-set damage, the loss minus the clean loss,
    against the forward passes of that restart): each restart is an independent search (seeded by its
    index alone), so one finished earlier (`kept`: restart -> its record, the trigger as a list) is read,
    not searched again; `after(record)` is called as each restart finishes (to keep it; it may stop)."""
    allowed = (~forbidden).nonzero().squeeze(1)
    best, before = {"loss": float("-inf")}, victim.cost.copy()
    clean = trigger_losses(victim, [torch.tensor([], dtype=torch.long)], texts)[0]
    cost = victim.cost.since(before)
    restarts = []
    for restart in range(a.uat_restarts):
        if restart in (kept or {}):
            found = {**kept[restart], "trigger": torch.tensor(kept[restart]["trigger"])}
        else:
            gen = torch.Generator().manual_seed(seed * 1000 + restart)
            start = start_trigger(restart, a.uat_trigger_len, init_token, allowed, gen)
            trace, spent = Trace(victim, victim.cost.copy()), victim.cost.copy()
            if a.uat_search == "beam":
                found = beam_search(victim, texts, start, a, forbidden, trace)
            else:
                found = gcg_search(victim, texts, start, a, forbidden, gen, trace)
            found = {**found, "restart": restart, "cost": victim.cost.since(spent),
                     "trace": [[n, loss - clean] for n, loss in trace.points]}
            if after is not None:
                after({**found, "trigger": found["trigger"].tolist()})
        restarts.append(found)
        cost = {k: v + found["cost"][k] for k, v in cost.items()}
        if found["loss"] > best["loss"]:
            best = {**found, "restart": restart}
    return {**best, "clean_loss": clean, "cost": cost, "restarts": restarts}
