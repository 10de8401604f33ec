"""The layout's promises, read off the source: imports run one way down the floors, no module
imports itself back through another (lazy imports included), and modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

# pretrain's floors, lowest first: a module may import its own floor and the ones below
FLOORS = ["core", "model", "data", "checkpoint", "formats", "train", "bench", "report", "commands"]
ROOF = {"pretrain", "pretrain.cli", "pretrain.__main__"}  # names every command; imports on demand
OUTSIDE = ("data_tools", "launch")  # use pretrain, never the reverse


def _modules() -> dict[str, Path]:
    out = {}
    for package in ("pretrain", *OUTSIDE):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at top level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if n in MODULES} or ({node.module} if node.module in MODULES else set())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
    return found


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "pretrain" or module in ROOF:
        return None
    return FLOORS.index(parts[1])


def test_imports_run_down_the_floors():
    wrong = []
    for module, path in MODULES.items():
        for target in _imports(path):
            if module.startswith("pretrain") and target.startswith(OUTSIDE):
                wrong.append(f"{module} -> {target} (pretrain never imports {', '.join(OUTSIDE)})")
            mine, theirs = _floor(module), _floor(target)
            if target in ROOF and module not in ROOF:
                wrong.append(f"{module} -> {target} (the roof imports floors, not the reverse)")
            elif mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} -> {target} ({FLOORS[mine]} must not import {FLOORS[theirs]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_even_through_lazy_imports():
    graph = {m: _imports(p) - {m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node}->{nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_no_module_grows_past_the_guard():
    """Cohesion decides a module's size (STYLE.md); this only guards against a module that
    swallows several responsibilities."""
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 800}
    assert not big, big


def test_only_the_engine_imports_deepspeed():
    users = [m for m, p in MODULES.items() if any(
        isinstance(n, (ast.Import, ast.ImportFrom)) and "deepspeed" in (
            getattr(n, "module", None) or ",".join(a.name for a in n.names)).split(".")[0]
        for n in ast.walk(ast.parse(p.read_text())))]
    assert set(users) <= {"pretrain.train.engine", "pretrain.formats.deepspeed_ckpt"}, users
