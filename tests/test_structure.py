"""The codebase's structure: an import graph without cycles, no function-level imports of our own modules,
the models installed as ``jaxcifar.models`` (never a top-level ``models``), even beside a foreign one."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"jaxcifar": REPO / "jaxcifar", "jaxcifar.models": REPO / "models"}


def _modules() -> dict[str, Path]:
    """Every module of the installed packages and their subpackages: dotted name -> source file."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


MAX_FUNCTION_LINES = 90


def test_no_function_is_longer_than_90_lines():
    """Small functions with one job: every function and method of the packages, decorators excluded."""
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_module_list_reaches_subpackages():
    modules = _modules()
    assert "jaxcifar.sources" in modules and "jaxcifar.sources.archive" in modules, sorted(modules)
    assert "jaxcifar.models.resnet" in modules


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.Module, modules: set[str], importer: str = "") -> list[tuple[str, bool]]:
    """(imported module of ours, whether the import sits inside a function) for every import statement
    outside ``if TYPE_CHECKING:`` blocks. ``from jaxcifar import x`` counts as importing jaxcifar.x when
    that is a module; importing a.b.c also runs the package a.b's ``__init__`` (unless ``importer`` is
    inside a.b, whose ``__init__`` is then already running)."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif node.module and node.level == 0:
                full = [f"{node.module}.{alias.name}" for alias in node.names]
                names = [name if name in modules else node.module for name in full]
            for name in names:
                parts = name.split(".")
                for i in range(2, len(parts) + 1):  # the subpackages whose __init__ runs on the way
                    prefix = ".".join(parts[:i])
                    inside = i < len(parts) and importer.startswith(prefix + ".")
                    if prefix in modules and not inside:
                        found.append((prefix, in_function))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(tree, False)
    return found


# Modules a child process runs as a script (``python -P FILE``): they import our package inside their entry
# function, once the process is set up (parent-death signal). Those imports count in the graph (no cycle may
# run through them); they are only allowed to sit inside a function.
RUN_AS_SCRIPT = {"jaxcifar.sources.decode_worker"}


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    inside_functions = []
    for name, path in modules.items():
        for target, in_function in _imports(ast.parse(path.read_text()), set(modules), name):
            if target == name:
                continue
            graph[name].add(target)
            if in_function and name not in RUN_AS_SCRIPT:
                inside_functions.append(f"{name} imports {target} inside a function")
    return graph, inside_functions


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Returns one import cycle (a list of modules, first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle_and_no_import_dodges_one():
    graph, inside_functions = _graph()
    assert len(graph) > 20 and "jaxcifar.loop" in graph["jaxcifar.pipeline"]  # the graph is really read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    assert inside_functions == []  # lazy imports stay for optional heavy packages only (torch, tensorboardX)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    tree = ast.parse("def f():\n    from jaxcifar import loop\nfrom jaxcifar.models import conv\n")
    modules = {"jaxcifar.loop", "jaxcifar.models", "jaxcifar.models.conv"}
    expected = [("jaxcifar.loop", True), ("jaxcifar.models", False), ("jaxcifar.models.conv", False)]
    assert _imports(tree, modules) == expected


def test_no_module_imports_a_top_level_models_package():
    offenders = []
    for path in [*REPO.glob("jaxcifar/*.py"), *REPO.glob("models/*.py"), *REPO.glob("tests/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "models" or n.startswith("models.")]
    assert offenders == []


def test_models_import_as_jaxcifar_models_from_the_models_folder():
    spec = importlib.util.find_spec("jaxcifar.models")
    assert spec is not None and Path(spec.origin) == REPO / "models" / "__init__.py"


def test_the_wheel_holds_the_models_folder_as_jaxcifar_models(tmp_path):
    """A regular (non-editable) install gets ``jaxcifar/models/*.py`` and no top-level ``models``."""
    source = tmp_path / "src"
    for name in ("jaxcifar", "models"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("jaxcifar-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"jaxcifar/models/__init__.py", "jaxcifar/models/resnet.py", "jaxcifar/models/conv.py"} <= set(names)
    assert not [n for n in names if n.startswith("models/")]


def test_a_foreign_models_package_does_not_break_training_or_the_report(tmp_path, chaos_env):
    """kuangliu/pytorch-cifar users have a top-level ``models`` package on sys.path (their clone): train
    with ``--report`` from inside such a folder, with it first on PYTHONPATH; importing it would fail."""
    foreign = tmp_path / "pytorch-cifar"
    (foreign / "models").mkdir(parents=True)
    (foreign / "models" / "__init__.py").write_text('raise ImportError("the foreign models package was imported")\n')
    env = {**chaos_env, "PYTHONPATH": os.pathsep.join([str(foreign), str(REPO)])}
    args = ["--data-source", "synthetic", "--train-subset", "64", "--test-subset", "32", "--width", "4"]
    args += ["--batch-size", "16", "--eval-batch-size", "32", "--epochs", "1", "--lr", "0.05", "--workdir", "run"]
    result = subprocess.run(
        [sys.executable, "-m", "jaxcifar.train", *args, "--report"],
        cwd=foreign,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    written = {p.name for p in (foreign / "run").iterdir()}
    assert {"misclassified.png", "gradcam.png", "report.json", "history.json"} <= written
    control = subprocess.run(
        [sys.executable, "-c", "import models"], cwd=foreign, env=env, capture_output=True, text=True
    )
    assert "the foreign models package was imported" in control.stderr  # the trap was set where Python looks
