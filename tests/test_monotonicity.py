"""Monotonicity: activation, parametrisation, certificate, save/load round trip."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM

from configs.experiment_config import ModelConfig
from utils.activations import GELU_ARGMIN, GELU_MIN, MonotoneGELU, is_non_decreasing
from utils.modeling import build_tiny_model, load_model, save_model
from utils.monotonicity import apply_monotonicity, certify, constrained_modules

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
    from utils.run_files import PipelineError
    with pytest.raises(PipelineError, match="no saved model"):
        load_model(tmp_path / "absent")
    model = tiny_model()
    (tmp_path / "pickled").mkdir()
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(PipelineError, match="no safetensors"):
        load_model(tmp_path / "pickled")
