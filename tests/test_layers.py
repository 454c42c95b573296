"""The import rules of shared/DESIGN.md: nothing below imports anything above, within a
package no module imports one ranked above it, no two modules import each other (directly
or around a circle, at module level or inside a function), and no module imports a private
name of another module."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "fastablate"
# Higher layers may import lower ones and their own layer, never higher ones.
LAYERS = {"fastablate.__main__": 8, "fastablate.cli": 8, "fastablate.commands": 8, "fastablate.config": 7,
          "fastablate.api": 7,
          "fastablate.engines.workflows": 6, "fastablate.engines.studies": 5, "fastablate.engines.core": 4,
          "fastablate.engines": 4, "fastablate.rundir": 3,
          "fastablate.models": 2, "fastablate.data": 2, "fastablate.attacks": 2, "fastablate.units": 1,
          "fastablate.ops": 0, "fastablate._ext": 0, "fastablate.errors": 0, "fastablate.files": 0,
          "fastablate.modes": 0, "fastablate.plots": 0, "fastablate": 0}
# Ranks inside a package: a module imports modules of its rank or below. Modules not listed
# rank with the package's __init__ (0).
RANKS = {
    "fastablate.engines.core": {"spec": 0, "distributed": 0, "tracking": 0, "attack_options": 1, "runtime": 1,
                                "setup": 2, "protocol": 3, "runner": 4},
    "fastablate.engines.studies": {"feature_plots": 0, "attack_plots": 0, "evaluation": 1, "noise_hooks": 1,
                                   "evaluate": 2, "attacks": 2, "noise": 2, "lesion": 2, "paths": 2, "features": 3,
                                   "train_loop": 3, "train": 4},
    "fastablate.engines.workflows": {"report": 0, "compare": 0, "sweep": 1, "comparison": 2, "robust": 3},
    "fastablate.attacks": {"base": 0, "sparse_rs": 1, "noise": 1, "gradient": 1, "sparse": 2, "ensemble": 3,
                           "registry": 4},
    "fastablate.units": {"parts": 0, "layers": 0, "discovery": 1},
}


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


MODULES = dict(_modules())


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


def _targets(tree):
    """The fastablate modules a module imports (a name imported from a module counts as the module)."""
    for target, name in _imports(tree):
        if target.startswith("fastablate"):
            yield (f"{target}.{name}" if name and _is_module(f"{target}.{name}") else target), name, target


@pytest.mark.parametrize("module", list(MODULES))
def test_layers_and_private_names(module):
    for full, name, target in _targets(MODULES[module]):
        assert _layer(full) <= _layer(module), f"{module} (layer {_layer(module)}) imports {full} ({_layer(full)})"
        if name and name.startswith("_") and not name.startswith("__") and not _is_module(f"{target}.{name}"):
            pytest.fail(f"{module} imports the private name {name} of {target}")


@pytest.mark.parametrize("package", list(RANKS))
def test_ranks_inside_packages(package):
    ranks = RANKS[package]
    assert set(ranks) == {m.rsplit(".", 1)[1] for m in MODULES if m.startswith(package + ".")}, \
        f"rank every module of {package}"
    for module in (m for m in MODULES if m.startswith(package + ".")):
        mine = ranks[module.rsplit(".", 1)[1]]
        for full, _, _ in _targets(MODULES[module]):
            if full.startswith(package + ".") and full != module:
                other = ranks[full[len(package) + 1:].split(".")[0]]
                assert other <= mine, f"{module} (rank {mine}) imports {full} (rank {other}) of {package}"


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in edges:
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, set[str]]:
    edges = {m: set() for m in MODULES}
    for m, tree in MODULES.items():
        for full, _, _ in _targets(tree):
            while full and full not in MODULES:
                full = full.rpartition(".")[0]
            # A module and the package it is in are one unit here (a package imports its parts).
            if full and full != m and not m.startswith(full + ".") and not full.startswith(m + "."):
                edges[m].add(full)
    return edges


def _defines_a_study(tree) -> bool:
    return any(isinstance(n, ast.ClassDef) and any(getattr(b, "id", None) == "Study" for b in n.bases)
               for n in tree.body)


STUDIES = [m for m, tree in MODULES.items() if m.startswith("fastablate.engines.studies.") and _defines_a_study(tree)]


@pytest.mark.parametrize("module", STUDIES)
def test_no_study_imports_a_sibling_study(module):
    """A study imports the shared pieces below it (the attacks library, the evaluation loop, the
    noise hooks, its own loop or figures), never another study."""
    imported = {full for full, _, _ in _targets(MODULES[module])}
    assert not imported & (set(STUDIES) - {module}), f"{module} imports {sorted(imported & set(STUDIES))}"


def test_the_studies_are_found():
    assert len(STUDIES) == 7 and "fastablate.engines.studies.train" in STUDIES


def test_no_import_circles():
    assert _circles(_graph()) == []


def test_a_circle_would_be_found():
    edges = _graph()
    edges["fastablate.engines.core.spec"].add("fastablate.engines.core.runner")  # spec -> runner -> spec
    assert any("fastablate.engines.core.spec" in c and "fastablate.engines.core.runner" in c for c in _circles(edges))


def test_functions_fit_on_a_screen():
    """No function of the package is over 60 lines: a reader holds one whole."""
    long = [f"{m}.{n.name} ({n.end_lineno - n.lineno + 1} lines)" for m, tree in MODULES.items()
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long
