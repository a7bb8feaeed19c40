"""The package's import graph: no circles, and each machine imports only what it installs.

The graph is read from the source (every import, at module level or inside a function), so an
import moved into a function to dodge a circle is still seen."""

import ast
import subprocess
import sys

from tests.paths import ROOT

PACKAGE = ROOT / "idc"
TRAINING_ONLY = ["tensorflow", "keras", "tf_keras", "tensorflow_hub", "sklearn", "matplotlib", "nncf"]


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from a.b import c` counts as a.b.c when c is a module)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_import_graph_has_no_circles():
    graph = import_graph()
    assert "idc.edge.web.app" in graph and graph["idc.edge.web.app"] >= {"idc.edge.web.state", "idc.edge.web.infer"}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_only_the_app_module_creates_the_flask_app():
    makers = [path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py")
              if any(isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Flask"
                     for node in ast.walk(ast.parse(path.read_text())))]
    assert makers == ["idc/edge/web/app.py"]


def test_light_modules_import_no_tensorflow():
    """idc.core (every machine), idc.slides (the edge box) and the cluster launcher (every node, before
    TensorFlow) stay light."""
    light = sorted(name for name in import_graph() if name.startswith(("idc.core", "idc.slides"))) + \
        ["idc.training.cluster"]
    code = ("import importlib, sys\n"
            f"for name in {light!r}: importlib.import_module(name)\n"
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_ONLY!r})\n"
            "print(heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_cluster_launcher_runs_without_tensorflow():
    blocker = ("import runpy, sys\n"
               f"for name in {TRAINING_ONLY!r}: sys.modules[name] = None\n"
               "sys.argv = ['idc.training.cluster', '--help']\n"
               "runpy.run_module('idc.training.cluster', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stdout + done.stderr
