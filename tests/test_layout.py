"""The code's layout: no import cycle among the project's modules, no script imported by another module,
short functions in the training entry, no module over 600 lines, no fault-injection hook in production code."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

MODULES = {p.stem: p for p in sorted(REPO.glob("*.py"))}
# Command-line scripts: nothing imports them (their helpers live in modules).
SCRIPTS = ("train_local", "evaluate", "visualize_results", "test_setup", "bench", "data")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def project_imports(path: Path) -> set[str]:
    """Project modules `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_no_import_cycle_among_the_project_modules():
    graph = {name: project_imports(path) - {name} for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name, trail):
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(other):] + [other]))
            if other not in state:
                visit(other, trail + [other])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_no_module_imports_a_script():
    offenders = {name: sorted(project_imports(path) & set(SCRIPTS)) for name, path in MODULES.items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_is_longer_than_600_lines():
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {k: v for k, v in lengths.items() if v > MAX_MODULE_LINES} == {}


@pytest.mark.parametrize("module", ["train_local", "engine", "runtime", "runfiles"])
def test_training_functions_are_at_most_80_lines(module):
    tree = ast.parse(MODULES[module].read_text())
    long = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}
    assert long == {}


def test_a_runs_unet_is_built_in_one_place():
    """models.unet_for_run is the one way a run's model is built (it used to be built in four places)."""
    builders = {name: len(re.findall(r"\bUNet\(", path.read_text())) for name, path in MODULES.items()
                if name != "models"}
    assert {k: v for k, v in builders.items() if v} == {}


def test_no_fault_injection_in_production_code():
    """Faults are injected by tests/faults.py from outside; no option, argument or environment hook for them."""
    hooks = re.compile(r"\bfaults?\b|\bfault[-_]|CELLMAP_DEBUG|\bpoison\s*=", re.I)
    found = {name: hooks.findall(path.read_text()) for name, path in MODULES.items()}
    assert {k: v for k, v in found.items() if v} == {}


def test_training_help_lists_exactly_the_options_table():
    import config_shenron as C

    done = subprocess.run([sys.executable, "train_local.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    flags = {word.rstrip(",") for line in done.stdout.splitlines() for word in line.split()
             if word.startswith("--") and word != "--help"}
    assert flags == {o.flag for o in C.OPTIONS}
