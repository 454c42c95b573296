"""The import rules of shared/DESIGN.md: nothing below imports anything above, and no
module imports a private name of another module."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "fastablate"
# Higher layers may import lower ones and their own layer, never higher ones.
LAYERS = {"fastablate.__main__": 6, "fastablate.cli": 6, "fastablate.commands": 6, "fastablate.config": 5,
          "fastablate.engines": 4, "fastablate.results": 3,
          "fastablate.models": 2, "fastablate.data": 2, "fastablate.units": 1, "fastablate.ops": 0,
          "fastablate._ext": 0, "fastablate.errors": 0, "fastablate.files": 0, "fastablate.modes": 0,
          "fastablate.plots": 0, "fastablate": 0}


def _layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rsplit(".", 1)[0]
    return LAYERS[module]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), ast.parse(path.read_text())


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                yield node.module, a.name


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    compiled = any(path.parent.glob(path.name + ".*.so")) or name == "fastablate._C"  # the extension, built or not
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() or compiled


@pytest.mark.parametrize("module, tree", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_layers_and_private_names(module, tree):
    for target, name in _imports(tree):
        if not target.startswith("fastablate"):
            continue
        full = f"{target}.{name}" if name and _is_module(f"{target}.{name}") else target
        assert _layer(full) <= _layer(module), f"{module} (layer {_layer(module)}) imports {full} ({_layer(full)})"
        if name and name.startswith("_") and not name.startswith("__") and not _is_module(f"{target}.{name}"):
            pytest.fail(f"{module} imports the private name {name} of {target}")
