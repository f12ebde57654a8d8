"""The code's shape (docs/architecture.md): sizes, layers and single owners, read from the source with ast."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medai"
MODULES = sorted(PACKAGE.rglob("*.py"))

# a module's layer (docs/architecture.md); imports may only go to the same layer or below
LAYERS = {
    1: ("errors", "paths", "atomic", "config", "tasks", "precision", "imaging", "runs", "store", "schema", "audit",
        "pages", "report"),
    2: ("data",),
    3: ("models",),
    4: ("training", "evaluation", "explain", "inference", "gate", "display"),
    5: ("analysis", "jobs", "backup", "restore", "auth", "shipping", "catalog", "doctor"),
    6: ("ui", "api", "pacs", "cli", "cli_train", "cli_trust", "cli_users", "cli_pacs", "__main__"),
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medai"):
            found |= {f"{node.module}.{a.name}" if node.module == "medai" else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medai")}
    return found


def test_every_module_has_a_layer():
    assert [_name(p) for p in MODULES if _name(p) != "medai" and _layer(_name(p)) is None] == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _name(p))
def test_modules_stay_small_and_functions_readable(path):
    assert len(path.read_text().splitlines()) <= 400
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(_tree(path))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _name(p))
def test_imports_never_go_up_a_layer(path):
    own = _layer(_name(path))
    if own is None:
        return
    upward = sorted(m for m in _imports(path) if (_layer(m) or 0) > own)
    assert upward == [], f"{_name(path)} (layer {own}) imports from above"


def _state_literals(path: Path) -> list[str]:
    """Run-folder file names anywhere, and state names compared with or stored as a ``state``."""
    states = {"queued", "running", "finished", "failed", "cancelled"}
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(
                r"status\.json|cancel\.request", node.value):
            found.append(node.value)
        elif isinstance(node, ast.Compare):
            found += [c.value for c in [node.left, *node.comparators]
                      if isinstance(c, ast.Constant) and c.value in states]
        elif isinstance(node, ast.Dict):
            found += [v.value for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)
                      and k.value == "state" and isinstance(v, ast.Constant) and v.value in states]
    return found


def test_the_run_folder_and_its_states_are_spelled_only_in_runs():
    assert {_name(p): _state_literals(p) for p in MODULES if p.name != "runs.py" and _state_literals(p)} == {}
    assert _state_literals(PACKAGE / "runs.py")  # the check does see them where they are


def test_no_architecture_branching_outside_models():
    names = re.compile(r"""isinstance\([^)]*\b(DenseNet121|ResNet18|HybridCNNTransformer|VisionTransformer)\b"""
                       r"""|startswith\(\(?["'](vit|hybrid|densenet|resnet|efficientnet)""")
    outside = [f"{_name(p)}: {m.group(0)}" for p in MODULES if p.parent.name != "models"
               for m in names.finditer(p.read_text())]
    assert outside == []
