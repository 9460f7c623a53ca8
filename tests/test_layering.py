"""The package's layering (ARCHITECTURE.md): a module imports only from its own subpackage
and from the layers above its own, never from a layer below, and no import cycles, counting
imports inside functions too."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tlapp"

# Top to bottom: a module may import from its own layer's modules (without cycles) and from
# every layer above it.
LAYERS = [
    ("leaves", ["tlapp.errors", "tlapp.constants", "tlapp.files", "tlapp.progress"]),
    ("augment spec", ["tlapp.augment.spec", "tlapp.augment"]),  # the package: a docstring
    ("config", ["tlapp.config"]),
    ("data", ["tlapp.data"]),
    ("augment ops", ["tlapp.augment.ops"]),
    ("backbones", ["tlapp.backbones"]),
    ("features", ["tlapp.features"]),
    ("reporting", ["tlapp.reporting"]),
    ("training", ["tlapp.training"]),
    ("inference", ["tlapp.inference"]),
    ("pipeline", ["tlapp.pipeline"]),
    ("entry points", ["tlapp.experiments", "tlapp.search", "tlapp.demo"]),
    ("command line", ["tlapp.cli", "tlapp.__main__"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific prefix that names `module`."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and ARCHITECTURE.md)"
    return best[0]


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported tlapp module, line) for every import in the file, nested ones included."""
    known = modules()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != "tlapp" and name != module:
                found.append((name, node.lineno))
                break
    return found


def test_every_module_has_a_layer():
    for module in modules():
        if module != "tlapp":
            layer_of(module)


def test_no_module_imports_from_a_layer_below():
    problems = []
    for module, path in modules().items():
        if module == "tlapp":  # the lazy public API names its targets as strings only
            continue
        mine = layer_of(module)
        for imported, line in imports_of(module, path):
            theirs = layer_of(imported)
            if theirs > mine:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} "
                                f"({LAYERS[mine][0]}) imports {imported} ({LAYERS[theirs][0]}, "
                                f"a lower layer)")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {module: {name for name, _ in imports_of(module, path)}
             for module, path in modules().items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                cycles.append(" -> ".join(stack[stack.index(other):] + [other]))
            elif other not in state:
                visit(other, stack + [other])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layering_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a leaf that imports the pipeline is reported."""
    fake = tmp_path / "errors.py"
    fake.write_text("def f():\n    from tlapp import pipeline\n")
    imported = imports_of("tlapp.errors", fake)
    assert imported == [("tlapp.pipeline", 2)]
    assert layer_of("tlapp.pipeline") > layer_of("tlapp.errors")


@pytest.mark.parametrize("statement", ["import tlapp", "import tlapp.cli; tlapp.cli.build_parser()",
                                       "import tlapp.config"])
def test_light_modules_do_not_import_tensorflow(statement):
    """`import tlapp`, `tlapp --help` and config validation do not wait for TensorFlow."""
    code = f"{statement}; import sys; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "False"]
