"""The library's layout: parts that import only the parts below them, no import cycles, and
checkpoints saved under the earlier flat layout still load."""
import ast
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from test_portable import _fresh_python
from utils.model.modeling import load_model
from utils.model.monotonicity import certify

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
# What each part of utils/ may import (besides configs/). The stage-level orchestration
# (utils/stages.py, recovery.py, measurement.py, text_attacks.py) sits on top and may import any part.
ALLOWED = {"run": set(), "data": {"run"}, "model": {"run"},
           "train": {"run", "model"}, "measure": {"run", "data", "model"},
           "attacks": {"run", "data", "model"}, "results": {"run"}}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports, at top level or inside functions."""
    files = [*ROOT.glob("utils/**/*.py"), *ROOT.glob("configs/*.py")]
    names = {_module_name(f) for f in files}
    graph = {}
    for f in files:
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[_module_name(f)] = {d for d in deps if d in names and d != _module_name(f)}
    return graph


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "utils" and len(parts) > 1 and parts[1] in ALLOWED else None


def test_the_import_graph_has_no_cycles():
    graph, state, cycles = _imports(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_each_part_imports_only_the_parts_below_it():
    graph = _imports()
    parts = {d.name for d in (ROOT / "utils").iterdir() if (d / "__init__.py").is_file()}
    assert parts == set(ALLOWED), "a part of utils/ without a rule here"
    wrong = [f"{m} -> {d}" for m, deps in graph.items() if _part(m) for d in deps
             if d.startswith("utils.") and _part(d) != _part(m) and _part(d) not in ALLOWED[_part(m)]]
    assert not wrong, f"imports against the layering: {wrong}"


def test_a_checkpoint_saved_under_the_flat_layout_still_loads(tmp_path):
    """tests/golden/old_layout_monotone was saved by commit ee644d1 (utils/ flat: utils/modeling.py,
    utils/portable/): a signed_units monotone model, its copied custom code and auto_map."""
    model_dir = shutil.copytree(GOLDEN / "old_layout_monotone", tmp_path / "model")
    expected = load_file(GOLDEN / "old_layout_monotone_logits.safetensors")
    model = load_model(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)
    assert certify(model, "mlp_both", trials=8, seed=0)["monotone"]
    # Its auto_map and the custom code it carries still open it without this project on the path.
    torch.save(expected["input_ids"], tmp_path / "x.pt")
    fresh = _fresh_python(model_dir, True, tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected["logits"], rtol=1e-5, atol=1e-6)
