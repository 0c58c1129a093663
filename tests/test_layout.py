"""The layout's rules, read from the source (every import, those inside functions included).

The pipeline reads bottom-up: ``fed_ser.core`` (model, local training, schedule, aggregation)
imports nothing above it; ``attacks`` and ``defenses`` never reach Flower, even through another
module; only ``fed_ser.flower`` imports ``flwr``; the deployment never reaches the experiments; no two
modules import each other in a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fed_ser", "attacks", "defenses")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules and top-level third-party packages it imports."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if t in files:
                    deps.add(t)
                elif t.split(".")[0] not in PACKAGES:
                    deps.add(t.split(".")[0])
        deps.discard(name)
        graph[name] = deps
    return graph


GRAPH = _import_graph()


def _reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in GRAPH.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_the_graph_sees_the_project() -> None:
    assert "fed_ser.core.training" in GRAPH and "flwr" in GRAPH["fed_ser.flower.strategy"]
    assert "fed_ser.core.metrics" in GRAPH["attacks.evasion.adversarial"]


@pytest.mark.parametrize("package", ["attacks", "defenses"])
def test_attacks_and_defenses_never_reach_flower(package: str) -> None:
    offenders = {m: sorted(d for d in _reach(m) if d == "flwr" or d.startswith("fed_ser.flower"))
                 for m in GRAPH if m.split(".")[0] == package}
    assert not {m: d for m, d in offenders.items() if d}


def test_only_the_flower_package_imports_flwr() -> None:
    importers = sorted(m for m, deps in GRAPH.items() if "flwr" in deps)
    assert importers and all(m.startswith("fed_ser.flower") for m in importers), importers


def test_the_core_imports_nothing_above_it() -> None:
    above = ("fed_ser.run", "fed_ser.flower", "fed_ser.engines", "fed_ser.recording", "fed_ser.experiments",
             "fed_ser.deployment", "fed_ser.tools", "fed_ser.data", "fed_ser.features", "attacks", "defenses")
    for m in (m for m in GRAPH if m.startswith("fed_ser.core")):
        bad = sorted(d for d in _reach(m) if d.startswith(above) or d in ("flwr", "ray", "hydra", "omegaconf"))
        assert not bad, f"{m} reaches {bad}"


def test_attacks_read_recorded_updates_and_the_core_only() -> None:
    allowed = ("fed_ser.core", "fed_ser.recording.store", "fed_ser.io", "attacks", "defenses")
    for m in (m for m in GRAPH if m.startswith(("attacks", "defenses"))):
        project = [d for d in GRAPH[m] if d.split(".")[0] in PACKAGES]
        assert all(d.startswith(allowed) for d in project), f"{m} imports {project}"


def test_deployment_never_reaches_the_experiments() -> None:
    """The deployment layer (processes, certificates, networks, the warm app processes) sits below the
    experiments: their drivers (``fed-ser-deploy``) use it, it never imports them, even through another module."""
    for m in (m for m in GRAPH if m.startswith("fed_ser.deployment")):
        bad = sorted(d for d in _reach(m) if d.startswith("fed_ser.experiments"))
        assert not bad, f"{m} reaches {bad}"


def _package(module: str) -> str:
    """The layer a module belongs to: ``fed_ser.<sub>``, ``attacks.<sub>`` or ``defenses.<sub>``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def test_no_cycles_between_layers() -> None:
    """Packages, not only modules, form a layered graph: no two layers reach each other (a cycle
    hidden in an import inside a function counts too)."""
    layers: dict[str, set[str]] = {}
    for m, deps in GRAPH.items():
        if "." not in m:
            continue
        layers.setdefault(_package(m), set()).update(_package(d) for d in deps if d in GRAPH and "." in d)
    for layer, deps in layers.items():
        deps.discard(layer)
    seen_cycle = []
    for a in layers:
        todo, reach = list(layers[a]), set()
        while todo:
            b = todo.pop()
            if b not in reach:
                reach.add(b)
                todo.extend(layers.get(b, ()))
        if a in reach:
            seen_cycle.append(a)
    assert not seen_cycle, f"layers in a cycle: {sorted(seen_cycle)}"


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if d not in GRAPH:
                continue
            # a package's __init__ importing its own submodule is not a cycle of the layout
            if state.get(d) == 1 and not (m.startswith(d + ".") or d.startswith(m + ".")):
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_ruff_passes() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is installed by the dev extra: pip install -e '.[dev]'")
    out = subprocess.run([str(ruff), "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
