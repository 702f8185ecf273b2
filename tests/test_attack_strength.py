"""Attack strength: the surrogate gradient (BPDA), the flat-region fractions, random search, PGD, the
convergence traces and the worst case, on constructed cases whose answers are known."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs.experiment_config import AttackConfig, ModelConfig
from utils.attacks import gcg, pgd
from utils.attacks.core import Victim, target_mask
from utils.attacks.masking import exact_gelu_backward, flat_fractions, has_flat_region
from utils.model.modeling import build_tiny_model
from utils.model.monotonicity import apply_monotonicity
from utils.model.portable.modeling_monotone import GELU_ARGMIN, MonotoneGELU
from utils.results.attack_checks import ranking
from utils.results.convergence import PLATEAU_GAIN, arm_curve, convergence, value_at
from utils.run.compute import CPU
from utils.text_attacks import worst_of

SMALL = ModelConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=50, context_length=64)


def _monotone_model():
    m = build_tiny_model(SMALL, 0)
    apply_monotonicity(m, "mlp_both", "monotone", 1e-3)
    m.eval().requires_grad_(False)
    return m


def _exact_gelu_grad(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def test_the_surrogate_keeps_the_forward_and_changes_the_gradient_exactly_below_the_clamp():
    act = MonotoneGELU()
    x = torch.linspace(-4, 3, 701, dtype=torch.float64, requires_grad=True)
    (plain,) = torch.autograd.grad(act(x).sum(), x)
    with exact_gelu_backward(act):
        y = act(x)
        (surrogate,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y.detach(), act(x).detach())                      # the forward values, bit for bit
    below = x.detach() < GELU_ARGMIN
    assert below.any() and (~below).any()
    assert (plain[below] == 0).all() and (surrogate[below] != 0).all()   # the clamp's flat region
    assert torch.allclose(surrogate[below], _exact_gelu_grad(x.detach()[below]), atol=1e-12)
    assert torch.equal(surrogate[~below], plain[~below])                  # the same gradient elsewhere
    assert act.forward.__func__ is MonotoneGELU.forward                   # restored on exit


def test_with_the_clamp_active_everywhere_only_the_surrogate_sees_through_the_mlp():
    """An MLP whose every pre-activation lies below the clamp: its own input gradient is exactly 0, the
    surrogate's is W2 diag(gelu'(h)) W1, the gradient of the same MLP with exact GELU."""
    model = _monotone_model()
    mlp = model.gpt_neox.layers[0].mlp
    with torch.no_grad():
        mlp.dense_h_to_4h.bias.fill_(-3.0)
    x = (0.1 * torch.randn(3, 32, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    (plain,) = torch.autograd.grad(mlp(x).sum(), x)
    with exact_gelu_backward(model):
        out = mlp(x)
        (surrogate,) = torch.autograd.grad(out.sum(), x)
    assert plain.abs().max() == 0 and torch.equal(out.detach(), mlp(x).detach())
    w1, w2 = mlp.dense_h_to_4h.weight, mlp.dense_4h_to_h.weight
    h = x.detach() @ w1.T + mlp.dense_h_to_4h.bias
    x_exact = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((F.gelu(x_exact @ w1.T + mlp.dense_h_to_4h.bias) @ w2.T).sum(), x_exact)
    assert (h < GELU_ARGMIN).all() and surrogate.abs().max() > 0
    assert torch.allclose(surrogate, expected, rtol=1e-4, atol=1e-12)
    # and the flat-region check counts every position of that layer, none of the other
    frac = flat_fractions(model, [torch.randint(1, 50, (9,)), torch.randint(1, 50, (9,))], "cpu")
    assert frac["flat_region"] and frac["fraction_below_clamp"][0] == 1.0 and frac["inputs_per_layer"] == 18 * 64
    assert frac["fraction_below_clamp"][1] < 1.0 and not has_flat_region(build_tiny_model(SMALL, 0))


def test_a_victim_under_the_surrogate_scores_the_same_and_differs_only_in_its_gradient():
    model = _monotone_model()
    with torch.no_grad():
        model.gpt_neox.layers[0].mlp.dense_h_to_4h.bias.fill_(-2.0)     # part of the MLP inputs below x*
    ids = torch.randint(1, 50, (16,), generator=torch.Generator().manual_seed(0))
    plain, bpda = Victim(model, CPU, 4), Victim(model, CPU, 4, surrogate_gradient="exact_gelu")
    assert torch.equal(plain.nll([ids])[0], bpda.nll([ids])[0])
    g_plain, g_bpda = plain.grads([ids], [target_mask(16)])[0], bpda.grads([ids], [target_mask(16)])[0]
    assert not torch.allclose(g_plain, g_bpda)
    assert torch.equal(g_plain, Victim(model, CPU, 4).grads([ids], [target_mask(16)])[0])   # nothing left patched


def test_random_search_keeps_the_threat_model_spends_gcgs_forward_budget_and_no_gradient():
    model = build_tiny_model(SMALL, 0).eval().requires_grad_(False)
    ids = torch.cat([torch.tensor([0]), torch.randint(2, 50, (20,), generator=torch.Generator().manual_seed(2))])
    forbidden = torch.zeros(50, dtype=torch.bool)
    forbidden[[0, 1]] = True
    a = AttackConfig(hotflip_max_flips=3, gcg_steps=8, gcg_search_width=12, gcg_top_k=6, batch_size=8)
    rnd = gcg.attack_text(Victim(model, CPU, 8), ids, a, forbidden, torch.Generator().manual_seed(1), "random")
    grad = gcg.attack_text(Victim(model, CPU, 8), ids, a, forbidden, torch.Generator().manual_seed(1))
    adv = torch.tensor(rnd["adversarial_ids"])
    changed = (adv != ids).nonzero().squeeze(1).tolist()
    assert changed == rnd["modified_positions"] and 0 not in changed and 0 < len(changed) <= 3
    assert not forbidden[adv[changed]].any() and rnd["abs_delta_nll"] > 0
    assert rnd["cost"]["gradient_passes"] == 0 and 2 + 8 < rnd["cost"]["forward_passes"] <= 2 + 8 * 12
    assert grad["cost"]["forward_passes"] <= 2 + 8 * 12
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=adv[None]).logits[0].double(), -1)
    t = target_mask(len(ids), changed)
    assert rnd["attacked_nll"] == pytest.approx(-logp[:-1][t[1:]].gather(1, adv[1:][t[1:]][:, None]).mean().item(), abs=1e-5)
    spent, best = zip(*rnd["trace"])
    assert len(spent) == 9 and list(best) == sorted(best) and best[-1] == pytest.approx(rnd["abs_delta_nll"], abs=1e-5)


def test_pgd_stays_in_its_ball_never_moves_eos_and_its_record_recomputes():
    model = build_tiny_model(SMALL, 0).eval().requires_grad_(False)
    ids = torch.cat([torch.tensor([0]), torch.randint(2, 50, (15,), generator=torch.Generator().manual_seed(3))])
    victim = Victim(model, CPU, 8)
    forbidden = torch.zeros(50, dtype=torch.bool)
    unit = pgd.mean_embedding_norm(victim, forbidden)
    assert unit == pytest.approx(float(model.get_input_embeddings().weight.norm(dim=1).mean()), rel=1e-6)
    small, d_small = pgd.attack_text(victim, ids, 0.05, unit, 5)
    large, d_large = pgd.attack_text(victim, ids, 0.5, unit, 5)
    for rec, delta in ((small, d_small), (large, d_large)):
        assert delta[0].abs().max() == 0 and delta.norm(dim=-1).max() <= rec["epsilon"] * (1 + 1e-5)
        with torch.no_grad():
            emb = model.get_input_embeddings()(ids) + delta
            logp = F.log_softmax(model(inputs_embeds=emb[None]).logits[0].double(), -1)
        assert rec["attacked_nll"] == pytest.approx(-logp[torch.arange(15), ids[1:]].mean().item(), abs=1e-5)
        assert rec["cost"]["gradient_passes"] == 6 and rec["trace"][-1][0] == 6
    assert 0 < small["abs_delta_nll"] < large["abs_delta_nll"]
    # The radius in token swaps: the median token's nearest other token lies exactly one unit away.
    emb = model.get_input_embeddings().weight.float()
    dist = torch.cdist(emb, emb).fill_diagonal_(float("inf")).min(dim=1).values
    swap = pgd.nearest_swap_distance(victim, forbidden)       # 50 tokens: the sample is all of them
    assert swap == pytest.approx(float(dist.median()), rel=1e-5)


def test_a_trace_is_read_as_a_step_function_and_the_plateau_rule_is_doubling_under_5_percent():
    trace = [[1, 0.0], [40, 0.5], [80, 0.9], [160, 1.0]]
    assert [value_at(trace, b) for b in (0, 1, 39, 40, 100, 1e9)] == [0.0, 0.0, 0.0, 0.5, 0.9, 1.0]
    flat = [[1, 0.0], [50, 1.0], [100, 1.04]]         # doubling 50 -> 100 adds 4%: plateaued
    rising = [[1, 0.0], [50, 0.5], [100, 1.0]]        # adds 100%
    one = arm_curve([[flat, flat], [flat]], n_boot=50)
    assert one["plateaued"] and one["relative_gain_last_half"] == pytest.approx(0.04)
    assert one["gain_last_half"]["mean"] == pytest.approx(0.04) and one["budget"] == 100
    assert one["mean"][0] == 0 and one["mean"][-1] == pytest.approx(1.04)
    # doubling from a quarter to half of the budget: 0 -> 1.0 for `flat` (no damage yet at 25), so no plateau there
    assert [d["relative_gain"] for d in one["doubling"]][1:] == [None, pytest.approx(0.04)]
    assert one["plateau_fraction_of_budget"] == 0.5
    two = arm_curve([[rising], [flat]], n_boot=200)
    assert not two["plateaued"]
    assert two["gain_last_half"]["mean"] == pytest.approx((0.5 + 0.04) / 2)
    assert two["relative_gain_last_half"] == pytest.approx(0.27 / 0.75) and 0.27 / 0.75 > PLATEAU_GAIN
    lo, hi = two["gain_last_half"]["ci95"]
    assert lo == pytest.approx(0.04) and hi == pytest.approx(0.5)       # seeds resampled: all-flat to all-rising


def test_the_worst_case_takes_each_texts_most_damaging_search():
    def rec(doc, d):
        return {"doc": doc, "abs_delta_nll": d, "clean_nll": 2.0, "attacked_nll": 2.0 + d, "rel_delta_nll": d / 2,
                "success": d / 2 > 0.15, "success_abs": d > 0.5, "n_flips": 1, "original_ids": [0, 1],
                "adversarial_ids": [0, doc], "modified_positions": [1]}
    done = {"hotflip": {"a": {"examples": [rec(1, 0.1), rec(2, 0.9), rec(3, 0.4)]}},
            "gcg": {"a": {"examples": [rec(1, 0.3), rec(2, 0.2)]}},
            "random_search": {"a": {"examples": [rec(1, 0.35), rec(2, 0.1)]}}}
    worst = worst_of(done, "a")
    assert [(w["doc"], w["attack"], w["abs_delta_nll"]) for w in worst] == [(1, "random_search", 0.35), (2, "hotflip", 0.9)]
    assert [w["success_abs"] for w in worst] == [False, True]       # the winning record's fields
    # The surrogate search (a fourth, independent search on the clamped arms only) never enters the worst case,
    # so every arm's worst case is over the same three searches.
    done["gcg_surrogate"] = {"a": {"examples": [rec(1, 2.0), rec(2, 2.0)]}}
    assert worst_of(done, "a") == worst


def test_the_surrogate_ranking_names_exactly_the_pairs_it_puts_the_other_way_round():
    def stat(mean, half):
        return {"mean": mean, "ci95": [mean - half, mean + half]}
    # GCG: a 0.9 > b 0.5 > c 0.4; the surrogate lifts c above b (inside the noise) and a stays first.
    arms = {"a": {"gcg_mean_abs_delta_nll": stat(0.9, 0.1), "gcg_surrogate_mean_abs_delta_nll": stat(0.9, 0.1)},
            "b": {"gcg_mean_abs_delta_nll": stat(0.5, 0.1), "gcg_surrogate_mean_abs_delta_nll": stat(0.5, 0.1)},
            "c": {"gcg_mean_abs_delta_nll": stat(0.4, 0.1), "gcg_surrogate_mean_abs_delta_nll": stat(0.55, 0.1)},
            "no_surrogate": {"gcg_mean_abs_delta_nll": stat(0.1, 0.1)},
            "no_records": {"gcg_mean_abs_delta_nll": {"mean": None, "ci95": None},          # a run without GCG
                           "gcg_surrogate_mean_abs_delta_nll": {"mean": None, "ci95": None}}}
    r = ranking(arms)
    assert r["order"] == {"gcg_mean_abs_delta_nll": ["a", "b", "c"], "gcg_surrogate_mean_abs_delta_nll": ["a", "c", "b"]}
    assert r["changed"] and [p["arms"] for p in r["swapped"]] == [["b", "c"]] and r["swapped"][0]["intervals_overlap"]
    assert ranking({"a": arms["a"], "no_records": arms["no_records"]}) is None        # nothing to rank
    arms["c"]["gcg_surrogate_mean_abs_delta_nll"] = stat(0.45, 0.01)        # below b again: the same order
    assert ranking(arms) == {"order": {"gcg_mean_abs_delta_nll": ["a", "b", "c"],
                                       "gcg_surrogate_mean_abs_delta_nll": ["a", "b", "c"]}, "swapped": [], "changed": False}


def test_uat_has_plateaued_when_every_restart_stopped_on_a_sweep_without_gain():
    """UAT's beam search stops after a sweep that gains nothing: such a restart is at its fixed point
    however steep its trace, so the plateau is 'every restart stopped', not the trace rule; a restart
    whose last sweep still gained ran into attack.uat_max_sweeps."""
    steep_then_stopped = [[0, 0.0], [100, 0.1], [200, 0.3], [300, 0.3]]      # the trace rule would say NO
    capped = [[0, 0.0], [100, 0.1], [200, 0.2], [300, 0.35]]                  # gained in its last sweep

    def raw(search):
        return {str(seed): {"uat.json": {"config": {"uat_search": search}, "models": {
            "stopped": {"restarts": [{"trace": steep_then_stopped}, {"trace": steep_then_stopped}]},
            "one_capped": {"restarts": [{"trace": steep_then_stopped}, {"trace": capped}]}}}} for seed in (1, 2)}

    arms = convergence(raw("beam"), n_boot=50)["uat"]["arms"]
    assert arms["stopped"]["plateaued"] is True and arms["stopped"]["restarts_stopped"] == [4, 4]
    assert arms["stopped"]["relative_gain_last_half"] == pytest.approx(2.0)       # 0.1 at B/2 -> 0.3
    assert arms["one_capped"]["plateaued"] is False and arms["one_capped"]["restarts_stopped"] == [2, 4]
    # GCG as UAT's search runs a fixed number of steps: there the trace rule decides.
    arms = convergence(raw("gcg"), n_boot=50)["uat"]["arms"]
    assert arms["stopped"]["plateaued"] is False and "restarts_stopped" not in arms["stopped"]



def test_transfer_beating_white_box_is_measured_per_text_against_the_best_unconstrained_source():
    """Three seeds of 10 texts: the baseline's adversarial texts do 0.3 more damage on the monotone arm than its
    own white-box search (masking), the pretrained model's 0.1 more, the other monotone arm's 0.5 more but it is
    not an unconstrained source; on the baseline itself, transfer from the pretrained model does 0.2 less."""
    from utils.results.attack_checks import masking
    rng = np.random.default_rng(0)
    raw = {}
    for seed in (1, 2, 3):
        docs = list(range(seed * 100, seed * 100 + 10))
        own = {arm: rng.uniform(0.2, 1.0, 10) for arm in ("monotonic", "baseline", "pretrained", "monotonic_init")}
        noise = lambda: rng.normal(0, 0.01, 10)                                   # noqa: E731
        shift = {("baseline", "monotonic"): 0.3, ("pretrained", "monotonic"): 0.1, ("monotonic_init", "monotonic"): 0.5,
                 ("pretrained", "baseline"): -0.2, ("monotonic", "baseline"): 0.0, ("monotonic_init", "baseline"): 0.0}
        transfer = {src: {arm: {"abs_delta_nll_per_text": list(own[arm] + d + noise())}
                          for (s, arm), d in shift.items() if s == src} for src in own}
        models = {arm: {"examples": [{"doc": d, "abs_delta_nll": float(v)} for d, v in zip(docs, own[arm])]}
                  for arm in own}
        raw[seed] = {"gcg.json": {"models": models, "transfer": transfer}}
    m = masking(raw, ["monotonic", "baseline"], n_boot=500)
    got = m["monotonic"]["transfer_minus_white_box_gcg"]
    assert got["source"] == "baseline" and got["mean"] == pytest.approx(0.3, abs=0.01) and got["ci95"][0] > 0.25
    assert got["n"] == 3 and got["n_texts"] == 30
    got = m["baseline"]["transfer_minus_white_box_gcg"]
    assert got["source"] == "pretrained" and got["mean"] == pytest.approx(-0.2, abs=0.01) and got["ci95"][1] < 0
    assert "transfer_minus_white_box_hotflip" not in m["monotonic"]                # no HotFlip file


def test_gradient_fidelity_reads_a_model_gradient_and_not_a_scrambled_one(tiny_run):
    """The check's power: on the tiny pretrained model the first-order gains of random search's uniform first-step
    swaps rank their exact gains (rho well above 0 over 12 texts); with the gradient replaced by noise, a gradient
    that predicts nothing, rho is near 0. Its passes are its own, counted apart."""
    from utils.attacks.core import forbidden_tokens, select_texts
    from utils.data.tokenization import TokenFile, load_tokenizer
    from utils.measurement import load_arm
    cfg, paths = tiny_run
    a = cfg.attack
    tok = load_tokenizer(paths.shared / "tokenizer")
    texts = select_texts(TokenFile(paths.shared / "tokens", "test"), tok.eos_token_id, 12, a.text_len, a.min_text_len, 42)
    victim = Victim(load_arm(paths.shared / "models" / "pretrained", "cpu"), CPU, a.batch_size)
    forbidden = forbidden_tokens(tok, victim.embeddings.shape[0])

    def rhos():
        out = [gcg.gradient_fidelity(victim, t["ids"], a, forbidden, torch.Generator().manual_seed(t["doc"])) for t in texts]
        assert all(r["swaps"] >= a.gcg_search_width - 2 and r["cost"]["gradient_passes"] == 1 for r in out)
        return np.array([r["spearman"] for r in out])
    real = rhos()
    torch.manual_seed(0)
    grads = victim.grads
    victim.grads = lambda seqs, targets: [torch.randn_like(g) for g in grads(seqs, targets)]
    scrambled = rhos()
    assert real.mean() > 0.15 and real.mean() / (real.std(ddof=1) / np.sqrt(len(real))) > 3, real
    assert abs(scrambled.mean()) < 0.15 and real.mean() - scrambled.mean() > 0.2, scrambled


def test_gradient_fidelity_is_summarised_per_arm_over_seeds_and_texts():
    from utils.results.attack_checks import masking
    raw = {seed: {"random_search.json": {"models": {"monotonic": {"examples": [
        {"doc": d, "abs_delta_nll": 0.1, "gradient_fidelity": {"spearman": rho}}
        for d, rho in enumerate([0.3, 0.5, float("nan")] if seed == 1 else [0.1, 0.3])]}}}} for seed in (1, 2)}
    got = masking(raw, ["monotonic"], n_boot=200)["monotonic"]["gradient_fidelity"]
    assert got["mean"] == pytest.approx(0.3) and got["n"] == 2 and got["n_texts"] == 4     # (0.4 + 0.2) / 2
