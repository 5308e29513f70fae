"""The house rules of docs/architecture.md, checked on the source: layers import only downwards, no import
cycles, the method core stays free of the MLOps stack and of argparse, and no function or module grows past
what a reader can hold (120 / 600 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "spf"

# Lower number = lower floor. A module may import its own floor or any floor below, never one above.
# (docs/architecture.md shows the same table.)
LAYERS: dict[str, int] = {
    "spf.io": 0,
    "spf.loaders": 0,
    "spf.models": 0,
    "spf.core.modes": 0,
    "spf.generation": 0,
    "spf.data": 1,
    "spf.refusal": 1,  # refusal phrases and the choice of a refused sample: data scenarios filter with it
    "spf.core": 2,
    "spf.estimate": 3,
    "spf.training": 4,
    "spf.eval": 5,
    "spf.analysis": 6,
    "spf.align": 6,
    "spf.bench": 7,
    "spf.pipeline": 8,
    "spf.cli": 9,
}
MAX_FUNCTION_LINES = 120
MAX_MODULE_LINES = 600
FORBIDDEN_IN_LIBRARY = ("prefect", "mlflow", "dvc")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int | None:
    best = None
    for prefix, floor in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best[0])
        ):
            best = (prefix, floor)
    return None if best is None else best[1]


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        out[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return out


SOURCES = _sources()


def _imports(tree: ast.Module, module: str) -> set[str]:
    """Every module named by an import statement anywhere in the file (lazy imports count too)."""
    found: set[str] = set()
    package = module if module.endswith("__init__") else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            for alias in node.names:  # `from spf.data import scenarios` names a module too
                if f"{name}.{alias.name}" in SOURCES:
                    found.add(f"{name}.{alias.name}")
    return found


def _in_type_checking(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def test_at_least_five_layer_packages() -> None:
    packages = [p.parent.name for p in PKG.glob("*/__init__.py")]
    assert len(packages) >= 5, packages


def test_every_module_has_a_floor() -> None:
    lost = [m for m in SOURCES if m not in ("spf", "spf.__main__") and _layer(m) is None]
    assert not lost, f"modules outside the layer table (add them to LAYERS and docs/architecture.md): {lost}"


def test_imports_only_run_downwards() -> None:
    upward = []
    for module, (_path, tree) in SOURCES.items():
        floor = _layer(module)
        if floor is None:
            continue
        for target in _imports(tree, module):
            if not target.startswith("spf.") or target == module:
                continue
            t_floor = _layer(target)
            if t_floor is not None and t_floor > floor:
                upward.append(f"{module} (floor {floor}) imports {target} (floor {t_floor})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for module, (_path, tree) in SOURCES.items():
        skip = _in_type_checking(tree)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and node.lineno not in skip:
                targets |= _imports(ast.Module(body=[node], type_ignores=[]), module)
        graph[module] = {
            t for t in targets if t in SOURCES and t != module and not module.startswith(t + ".")
        }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_library_never_imports_the_mlops_stack_and_only_the_cli_parses_arguments() -> None:
    bad = []
    for module, (_path, tree) in SOURCES.items():
        for target in _imports(tree, module):
            top = target.split(".")[0]
            if top in FORBIDDEN_IN_LIBRARY:
                bad.append(f"{module} imports {target}")
            if top == "argparse" and not module.startswith("spf.cli"):
                bad.append(f"{module} imports argparse (command-line parsing belongs in spf/cli)")
    assert not bad, "\n".join(bad)


def test_functions_and_modules_stay_readable() -> None:
    long_modules, long_functions = [], []
    for path, tree in SOURCES.values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)}: {n} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines"
                    )
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)


def test_public_names_stay_objects_after_their_layers_are_imported() -> None:
    """A subpackage named like a public function (`spf.train`) would replace it once imported."""
    import importlib

    import spf

    for module in ("spf.training.config", "spf.training.loop", "spf.core.subspace", "spf.data.samples"):
        importlib.import_module(module)
    for name in spf.__all__:
        value = getattr(spf, name)
        assert not isinstance(value, type(spf)), f"spf.{name} is a module, not the public object"
    assert callable(spf.train) and spf.train.__module__ == "spf.training.loop"
