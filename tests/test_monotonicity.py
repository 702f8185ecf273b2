"""Monotonicity: activation, parametrisation, certificate, save/load round trip."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM

from configs.experiment_config import ModelConfig
from utils.model.activations import GELU_ARGMIN, GELU_MIN, MonotoneGELU, is_non_decreasing
from utils.model.modeling import build_tiny_model, load_model, save_model
from utils.model.monotonicity import apply_monotonicity, certify, constrained_modules, project_constrained_

SMALL = ModelConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=128, context_length=32)


def tiny_model(seed=0):
    return build_tiny_model(SMALL, seed).eval()


def test_gelu_argmin_is_the_stationary_point():
    x = torch.tensor(GELU_ARGMIN, dtype=torch.float64, requires_grad=True)
    y = F.gelu(x)
    y.backward()
    assert abs(x.grad.item()) < 1e-12
    assert GELU_ARGMIN == pytest.approx(-0.7518, abs=1e-4) and GELU_MIN == pytest.approx(-0.16997, abs=1e-5)


def test_monotone_gelu_equals_gelu_where_gelu_increases_and_is_flat_below():
    x = torch.linspace(-8, 8, 10001, dtype=torch.float64)
    y = MonotoneGELU()(x)
    right = x >= GELU_ARGMIN
    assert torch.equal(y[right], F.gelu(x[right]))
    assert torch.allclose(y[~right], torch.full_like(y[~right], GELU_MIN))
    assert is_non_decreasing(MonotoneGELU())
    assert not is_non_decreasing(torch.nn.GELU())   # trap 1


def test_softplus_init_is_abs_plus_eps_and_weights_are_non_negative():
    model = tiny_model()
    originals = {n: m.weight.detach().clone() for n, m in constrained_modules(model, "mlp_both").items()}
    names = apply_monotonicity(model, "mlp_both", "monotone", 1e-3)
    assert sorted(originals) == names and len(names) == 2 * SMALL.n_layer
    for name, mod in constrained_modules(model, "mlp_both").items():
        assert parametrize.is_parametrized(mod, "weight")
        assert torch.allclose(mod.weight, originals[name].abs() + 1e-3, atol=1e-6)
        assert (mod.weight > 0).all()
    assert model.config.hidden_act == "monotone_gelu"
    # Attention and embeddings stay free.
    assert not parametrize.is_parametrized(model.gpt_neox.layers[0].attention.dense, "weight")


def test_gradients_reach_the_pre_parameters():
    model = tiny_model()
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6)
    ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    v = model.gpt_neox.layers[0].mlp.dense_h_to_4h.parametrizations.weight.original
    assert v.grad is not None and v.grad.abs().sum() > 0


def _independent_monotonicity_check(mlp, trials=200, seed=1):
    """Our own check, separate from the certificate: random x <= x' pairs in float64."""
    mlp = copy.deepcopy(mlp).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(trials, mlp.dense_h_to_4h.in_features, generator=g, dtype=torch.float64) * 3
    x2 = x + torch.rand(x.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return float((mlp(x2) - mlp(x)).min())


def test_monotone_mlp_is_monotone_and_certificate_agrees():
    model = tiny_model()
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6)
    for layer in model.gpt_neox.layers:
        assert _independent_monotonicity_check(layer.mlp) >= -1e-9
    ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    cert = certify(model, "mlp_both", trials=16, seed=0, input_ids=ids)
    assert cert["monotone"] and cert["total_violations"] == 0 and cert["min_weight"] > 0
    assert all(l["property_test_comparisons"] > 0 for l in cert["layers"])


def test_certificate_fails_on_keep_gelu():
    model = tiny_model()
    apply_monotonicity(model, "mlp_both", "keep", 1e-6)
    # A constructive counterexample: inputs that put every hidden unit left of
    # GELU's minimum, where raising the input lowers every hidden activation.
    mlp = model.gpt_neox.layers[0].mlp
    x = -4 * torch.ones(1, SMALL.d_model)
    with torch.no_grad():
        assert (mlp(x + 0.1) < mlp(x)).all()
    cert = certify(model, "mlp_both", trials=32, seed=0)
    assert not cert["monotone"] and cert["total_violations"] > 0
    assert all(not l["activation_non_decreasing"] for l in cert["layers"])


def test_certificate_reads_real_weights_of_an_unconstrained_model():
    model = tiny_model()
    cert = certify(model, "mlp_both", trials=16, seed=0)
    true_min = min(float(m.weight.detach().min()) for m in constrained_modules(model, "mlp_both").values())
    assert cert["min_weight"] == pytest.approx(true_min) and true_min < 0   # trap 3: no "Infinity"
    assert not cert["monotone"]


def test_mlp_in_scope_certifies_only_the_hidden_map():
    model = tiny_model()
    apply_monotonicity(model, "mlp_in", "monotone", 1e-6)
    cert = certify(model, "mlp_in", trials=16, seed=0)
    assert cert["monotone"] and "hidden map" in cert["claim"]
    assert len(cert["layers"][0]["weights"]) == 1


def test_save_load_round_trip_keeps_parametrisation_and_outputs(tmp_path):
    model = tiny_model()
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6)
    ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    mod = back.gpt_neox.layers[1].mlp.dense_4h_to_h
    assert parametrize.is_parametrized(mod, "weight")
    assert isinstance(back.gpt_neox.layers[0].mlp.act, MonotoneGELU)
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, ref, atol=1e-5)
        # Plain transformers loading gives the same function from the materialised weights.
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
        assert torch.allclose(plain(input_ids=ids).logits, ref, atol=1e-5)
    # A second save/load does not drift (no eps added again).
    save_model(back, tmp_path / "m2")
    again = load_model(tmp_path / "m2")
    assert torch.allclose(again.gpt_neox.layers[1].mlp.dense_4h_to_h.weight, mod.weight, rtol=1e-5, atol=1e-9)


def test_loading_refuses_missing_or_pickle_only_models(tmp_path):
    from utils.run.run_files import PipelineError
    with pytest.raises(PipelineError, match="no saved model"):
        load_model(tmp_path / "absent")
    model = tiny_model()
    (tmp_path / "pickled").mkdir()
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(PipelineError, match="no safetensors"):
        load_model(tmp_path / "pickled")


# -- constructions (monotone.construction, monotone.init) ------------------------

CONSTRUCTIONS = ("softplus_abs", "signed_units", "projected")


def _unit_signs_expected(w1, w2):
    """s_k by hand: +1 where the unit's positive pretrained mass is at least its negative mass."""
    mass = torch.cat([w1, w2.T], dim=1)
    return torch.where(mass.clamp(min=0).sum(1) >= (-mass).clamp(min=0).sum(1), 1.0, -1.0)


@pytest.mark.parametrize("init", ["abs", "clip"])
@pytest.mark.parametrize("construction", CONSTRUCTIONS)
def test_each_construction_starts_where_its_init_says_and_is_monotone(construction, init):
    model = tiny_model()
    w0 = [(l.mlp.dense_h_to_4h.weight.detach().clone(), l.mlp.dense_4h_to_h.weight.detach().clone())
          for l in model.gpt_neox.layers]
    apply_monotonicity(model, "mlp_both", "monotone", 1e-3, construction, init)
    eps = 0.0 if construction == "projected" else 1e-3
    for (a, b), layer in zip(w0, model.gpt_neox.layers):
        s = _unit_signs_expected(a, b) if construction == "signed_units" else torch.ones(a.shape[0])
        for w_start, mod, sb in ((a, layer.mlp.dense_h_to_4h, s.view(-1, 1)), (b, layer.mlp.dense_4h_to_h, s.view(1, -1))):
            magnitude = (w_start * sb).abs() if init == "abs" else (w_start * sb).clamp(min=0)
            assert torch.allclose(mod.weight, (magnitude + eps) * sb, atol=1e-6)
            assert parametrize.is_parametrized(mod, "weight") == (construction != "projected")
        assert _independent_monotonicity_check(layer.mlp) >= -1e-9
    cert = certify(model, "mlp_both", trials=16, seed=0, input_ids=torch.randint(0, SMALL.vocab_size, (2, 16)))
    assert cert["monotone"] and cert["construction"] == construction and cert["min_weight"] >= 0
    concave = sum(l["concave_units"] for l in cert["layers"])
    assert (concave > 0) == (construction == "signed_units")     # random weights: both signs occur


def test_signed_units_make_concave_units_that_the_paper_construction_cannot():
    """A unit with s_k = -1 computes -a act(-b.h + c): non-decreasing and concave, where every
    softplus_abs unit is convex. Second differences along a ray show both curvatures."""
    model = tiny_model()
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6, "signed_units", "abs")
    mlp = copy.deepcopy(model.gpt_neox.layers[0].mlp).double()
    t = torch.linspace(-6, 6, 241, dtype=torch.float64)[:, None]
    with torch.no_grad():
        y = mlp(t * torch.ones(1, SMALL.d_model, dtype=torch.float64))
    second = y[2:] - 2 * y[1:-1] + y[:-2]
    assert (y[1:] - y[:-1]).min() >= -1e-9                          # monotone along the ray
    assert second.min() < -1e-6 and second.max() > 1e-6             # neither convex nor concave


@pytest.mark.parametrize("construction", CONSTRUCTIONS)
def test_each_certificate_fails_on_a_broken_model_of_its_kind(construction):
    model = tiny_model()
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6, construction, "abs")
    mlp = model.gpt_neox.layers[1].mlp
    with torch.no_grad():
        if construction == "signed_units":
            # W2's unit 0 takes the opposite sign to W1's: each matrix alone is still "signed softplus".
            mlp.dense_4h_to_h.parametrizations.weight[0].signs[0] *= -1
        elif construction == "softplus_abs":
            # The parametrisation removed and one weight negative: a plain matrix slipped through.
            parametrize.remove_parametrizations(mlp.dense_h_to_4h, "weight")
            mlp.dense_h_to_4h.weight[0, 0] = -0.5
        else:
            mlp.dense_4h_to_h.weight[0, 0] = -0.5                  # a step whose projection was skipped
    cert = certify(model, "mlp_both", trials=16, seed=0)
    assert not cert["monotone"] and cert["min_weight"] < 0
    assert cert["layers"][0]["monotone"] and not cert["layers"][1]["monotone"]


def test_projection_after_an_optimizer_step_restores_non_negativity():
    model = tiny_model().train()
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6, "projected", "clip")
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    ids = torch.randint(0, SMALL.vocab_size, (4, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    mods = constrained_modules(model, "mlp_both").values()
    assert min(float(m.weight.detach().min()) for m in mods) < 0   # the step alone leaves the set
    project_constrained_(model)
    assert min(float(m.weight.detach().min()) for m in mods) == 0.0
    assert certify(model, "mlp_both", trials=16, seed=0)["monotone"]


@pytest.mark.parametrize("construction", CONSTRUCTIONS)
def test_save_load_round_trip_for_each_construction(construction, tmp_path):
    model = tiny_model()
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6, construction, "clip")
    ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.config.monotone == model.config.monotone
    w1 = back.gpt_neox.layers[0].mlp.dense_h_to_4h
    if construction == "signed_units":       # the signs come back from the materialised weights
        assert torch.equal(w1.parametrizations.weight[0].signs,
                           model.gpt_neox.layers[0].mlp.dense_h_to_4h.parametrizations.weight[0].signs)
    assert parametrize.is_parametrized(w1, "weight") == (construction != "projected")
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, ref, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
        assert torch.allclose(plain(input_ids=ids).logits, ref, atol=1e-5)
    assert certify(back, "mlp_both", trials=16, seed=0)["monotone"]


def test_signed_units_needs_both_mlp_matrices():
    with pytest.raises(ValueError, match="mlp_both"):
        apply_monotonicity(tiny_model(), "mlp_in", "monotone", 1e-6, "signed_units")


def test_constrained_weights_are_cached_across_forwards_only_where_they_fit_with_the_same_numbers():
    """constrained_cache: every W = softplus(V) computed once for several forwards where twice their bytes fit
    the room left (a GPU's free memory), else each layer's W computed as it runs (a 40 GB card measuring
    pythia-6.9b): the outputs are equal bit for bit."""
    from utils.model.monotonicity import constrained_cache
    model = tiny_model()
    apply_monotonicity(model, "mlp_both", "monotone", 1e-3)
    mods = list(constrained_modules(model, "mlp_both").values())
    need = sum(m.parametrizations.weight.original.numel() * 4 for m in mods)
    calls = []
    for m in mods:
        m.parametrizations.weight[0].register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    outs = {}
    for name, room in (("fits", 2 * need + 1), ("does not fit", 2 * need)):
        calls.clear()
        with torch.no_grad(), constrained_cache(model, free_bytes=room):
            outs[name] = [model(input_ids=ids).logits for _ in range(3)]
        assert len(calls) == len(mods) * (1 if name == "fits" else 3), name
    assert all(torch.equal(a, b) for a, b in zip(outs["fits"], outs["does not fit"]))
