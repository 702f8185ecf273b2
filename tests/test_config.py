import ast
import dataclasses
from pathlib import Path

import pytest

from configs.experiment_config import ConfigError, ExperimentConfig
from configs.presets import PRESETS, load_config
from conftest import ROOT, run_script


def test_every_preset_loads_and_validates():
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.preset == name
    big = load_config("pythia-1.4b")
    assert big.model.hub_id == "EleutherAI/pythia-1.4b" and big.data.seq_len == 2048
    assert big.data.test_file == "test.jsonl.zst"   # held-out file, never train documents


def test_override_types_are_coerced():
    cfg = load_config("tiny", [("pretrain.lr", "1e-4"), ("data.quick", "false"), ("model.n_layer", "2")])
    assert cfg.pretrain.lr == 1e-4 and cfg.data.quick is False and cfg.model.n_layer == 2


@pytest.mark.parametrize("key,value,fragment", [
    ("pretrain.lrr", "1", "unknown config key 'pretrain.lrr'"),
    ("nosuch.lr", "1", "unknown config section 'nosuch'"),
    ("pretrain.lr", "fast", "expected float"),
    ("data.quick", "maybe", "expected true/false"),
    ("monotone.scope", "everything", "monotone.scope must be one of"),
    ("monotone.construction", "relu", "monotone.construction must be one of"),
    ("monotone.init", "zero", "monotone.init must be one of"),
    ("model.n_head", "3", "divisible"),
])
def test_bad_overrides_raise_one_clear_error(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", [(key, value)])


def test_signed_units_outside_the_both_matrices_scope_is_a_config_error():
    with pytest.raises(ConfigError, match="signed_units .* needs monotone.scope=mlp_both"):
        load_config("tiny", [("monotone.construction", "signed_units"), ("monotone.scope", "mlp_in")])
    assert load_config("tiny", [("monotone.construction", "signed_units")]).monotone.scope == "mlp_both"


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [("pretrain.lr", "-1"), ("monotone.init_eps", "0")])
    assert "pretrain.lr" in str(e.value) and "monotone.init_eps" in str(e.value)


def test_tiny_architecture_overrides_on_a_hub_or_local_model_are_an_error():
    with pytest.raises(ConfigError, match=r"model.n_layer describe the tiny model built here; with model.source=hub"):
        load_config("pythia-410m", [("model.n_layer", "2")])
    with pytest.raises(ConfigError, match=r"model.d_model describe .* model.source=local"):
        load_config("tiny", [("model.source", "local"), ("model.path", "/m"), ("model.d_model", "64"),
                             ("controls.pretrain_snapshots", "")])
    with pytest.raises(ConfigError, match=r"with model.source=local set controls.pretrain_snapshots= \(empty\)"):
        load_config("tiny", [("model.source", "local"), ("model.path", "/m"), ("controls.pretrain_snapshots", "40000")])
    assert load_config("tiny", [("model.n_layer", "2")]).model.n_layer == 2      # the tiny model: fine


def test_the_ladder_and_the_same_history_frontier_are_validated_together():
    for preset in ("tiny", "pythia-1.4b"):      # the presets read the verdict against the monotone arm's own history
        cfg = load_config(preset)
        assert cfg.analysis.frontier == "same_history" and cfg.controls.ladder and cfg.controls.unconstrained_from_init
        assert not cfg.controls.pretrain_snapshots and not cfg.controls.revisions
    with pytest.raises(ConfigError, match=r"controls.ladder must be distinct fractions in \(0, 1\)"):
        load_config("tiny", [("controls.ladder", "0.5,1.0")])
    with pytest.raises(ConfigError, match="controls.ladder trains at unconstrained_from_init's chosen lr"):
        load_config("tiny", [("controls.unconstrained_from_init", "false"), ("analysis.frontier", "all")])
    with pytest.raises(ConfigError, match="analysis.frontier=same_history needs controls.ladder"):
        load_config("tiny", [("controls.ladder", "")])
    assert load_config("tiny", [("controls.ladder", ""), ("analysis.frontier", "all")]).controls.ladder == ""


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("pythia-99b")


def test_environment_then_cli_overrides():
    env = {"MONO__PRETRAIN__LR": "0.5", "MONO__SEED": "7", "UNRELATED": "x"}
    cfg = load_config("tiny", [("pretrain.lr", "0.25")], environ=env)
    assert cfg.seed == 7 and cfg.pretrain.lr == 0.25
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config("tiny", environ={"MONO__PRETRAIN__NOPE": "1"})


def test_quick_switch_selects_document_counts():
    cfg = load_config("pythia-1.4b")       # training documents: as many as the budget needs (0)
    assert cfg.data.max_docs("train") == 0 and cfg.data.max_docs("test") == 10_000
    cfg = load_config("pythia-1.4b", [("data.quick", "true")])
    assert cfg.data.max_docs("train") == 0 and cfg.data.max_docs("test") == 1_000


def test_stage_script_rejects_bad_config_with_exit_2(tmp_path):
    r = run_script("stage_1_apply_monotonicity", "--work-dir", str(tmp_path), "--set", "pretrain.lrr=1")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: unknown config key")
    r = run_script("stage_0_setup", "--preset", "nope", "--work-dir", str(tmp_path))
    assert r.returncode == 2 and "unknown preset" in r.stderr
    assert not any(tmp_path.iterdir())   # nothing written


def test_help_lists_the_common_flags():
    r = run_script("stage_0_setup", "--help")
    assert r.returncode == 0
    for flag in ("--preset", "--seed", "--work-dir", "--set"):
        assert flag in r.stdout


# Fields read through a computed name: DataConfig.max_docs (f"{split}_docs") and
# corpus.documents (f"{split}_file"); test_quick_switch and the local-source
# tests in test_data.py exercise them.
DYNAMIC_FIELDS = {f"{p}{s}_docs" for p in ("", "quick_") for s in ("train", "val", "test")} | \
                 {f"{s}_file" for s in ("train", "val", "test")} | {"quick"}   # quick: read by max_docs


def _attribute_names_read(paths) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
    return names


def test_every_config_field_is_read_by_the_pipeline():
    code = [*ROOT.glob("utils/**/*.py"), *ROOT.glob("scripts/*.py")]
    read = _attribute_names_read(code) | DYNAMIC_FIELDS
    unread = []
    cfg = ExperimentConfig()
    for section in [cfg, *(getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                           if dataclasses.is_dataclass(getattr(cfg, f.name)))]:
        for f in dataclasses.fields(section):
            if not dataclasses.is_dataclass(getattr(section, f.name)) and f.name not in read:
                unread.append(f"{type(section).__name__}.{f.name}")
    assert not unread, f"config fields no code reads: {unread}"
