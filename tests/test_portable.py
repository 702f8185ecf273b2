"""A saved monotone model opens in any Hugging Face program, without this project on the path."""
import json
import os
import subprocess
import sys

import torch

from configs.experiment_config import ModelConfig
from utils.model.modeling import build_tiny_model, load_model, save_model
from utils.model.monotonicity import apply_monotonicity

FRESH = """
import importlib.util, sys, torch
from transformers import AutoModelForCausalLM
assert importlib.util.find_spec("utils") is None and importlib.util.find_spec("configs") is None
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == "1").eval()
x = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model(input_ids=x).logits, sys.argv[4])
"""


def _fresh_python(model_dir, trust, tmp_path):
    """A new interpreter in isolated mode (-I: no cwd, no PYTHONPATH on sys.path), own HF cache."""
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    return subprocess.run([sys.executable, "-I", str(script), str(model_dir), "1" if trust else "0",
                           str(tmp_path / "x.pt"), str(tmp_path / "logits.pt")], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "HF_HOME": str(tmp_path / "hf")}, timeout=300)


def test_monotone_checkpoint_loads_with_trust_remote_code_and_gives_the_same_logits(tmp_path):
    model = build_tiny_model(ModelConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=97), 0)
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6)
    save_model(model, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["hidden_act"] == "monotone_gelu"
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_monotone.GPTNeoXForCausalLM"}
    assert (tmp_path / "model" / "modeling_monotone.py").exists()
    x = torch.randint(0, 97, (3, 12))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        ours = load_model(tmp_path / "model").eval()(input_ids=x).logits
    r = _fresh_python(tmp_path / "model", True, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0), (theirs - ours).abs().max()
    # Without trust_remote_code: an error naming the activation, never a model with another one.
    r = _fresh_python(tmp_path / "model", False, tmp_path)
    assert r.returncode != 0 and "monotone_gelu" in r.stderr


def test_a_model_with_the_papers_gelu_needs_no_custom_code(tmp_path):
    model = build_tiny_model(ModelConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=97), 0)
    apply_monotonicity(model, "mlp_both", "keep", 1e-6)
    save_model(model, tmp_path / "model")
    assert "auto_map" not in json.loads((tmp_path / "model" / "config.json").read_text())
    assert not (tmp_path / "model" / "modeling_monotone.py").exists()
