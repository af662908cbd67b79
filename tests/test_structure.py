"""The structure the code keeps (docs/architecture.md): layers, sizes, and who may change a request.

Read from the source with ``ast``, nothing is imported or run: these hold for every module,
including code paths the other tests do not reach.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNTIME = ("ipc", "contexts", "backends", "scheduler", "console")
PACKAGES = (*RUNTIME, "benchmarks")
# Which of our packages each package may import: a layered DAG, so no circle is possible.
MAY_IMPORT = {
    "ipc": set(),
    "contexts": {"ipc"},
    "backends": {"ipc", "contexts"},
    "scheduler": {"ipc"},
    "benchmarks": {"ipc", "contexts", "backends", "scheduler"},
    "console": {"ipc", "scheduler", "benchmarks"},
}
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 300
MAX_DAEMON_LINES = 400
MAX_FMT_SKIP = 15
REQUEST_NAMES = {"req", "request", "r"}  # what the scheduler calls a Request
REQUEST_OWNERS = {"scheduler/core.py", "scheduler/request.py"}


def sources(packages=PACKAGES) -> list[tuple[str, ast.Module, str]]:
    out = []
    for pkg in packages:
        for path in sorted((REPO / pkg).rglob("*.py")):
            text = path.read_text()
            out.append((path.relative_to(REPO).as_posix(), ast.parse(text), text))
    return out


def imported(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_layers_import_downwards_only():
    bad = []
    for rel, tree, _ in sources():
        pkg = rel.split("/")[0]
        for target in imported(tree) & set(PACKAGES) - {pkg}:
            if target not in MAY_IMPORT[pkg]:
                bad.append(f"{rel} imports {target}")
    assert bad == []


@pytest.mark.parametrize("limit_kind", ["function", "class"])
def test_sizes(limit_kind):
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef) if limit_kind == "function" else (ast.ClassDef,)
    limit = MAX_FUNCTION_LINES if limit_kind == "function" else MAX_CLASS_LINES
    big = [
        f"{rel}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for rel, tree, _ in sources()
        for node in ast.walk(tree)
        if isinstance(node, kinds) and node.end_lineno - node.lineno + 1 > limit
    ]
    assert big == []


def test_daemon_only_dispatches():
    assert len((REPO / "scheduler/daemon.py").read_text().splitlines()) < MAX_DAEMON_LINES


def test_requests_change_only_through_the_scheduler():
    """As in nano-vllm: every change of a request's state goes through the scheduler core or the request."""
    writes = []
    for rel, tree, _ in sources(RUNTIME):
        if rel in REQUEST_OWNERS:
            continue
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                for el in t.elts if isinstance(t, ast.Tuple) else [t]:
                    if isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name):
                        if el.value.id in REQUEST_NAMES:
                            writes.append(f"{rel}:{el.lineno} {el.value.id}.{el.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
                if getattr(node.args[0], "id", None) in REQUEST_NAMES:
                    writes.append(f"{rel}:{node.lineno} setattr")
    assert writes == []


def test_wire_fields_are_read_in_ipc_only():
    """Messages are decoded into typed records once, in ``ipc``; handlers elsewhere read records."""
    lookups = [
        f"{rel}:{i}"
        for rel, _, text in sources(PACKAGES)
        if not rel.startswith("ipc/")
        for i, line in enumerate(text.splitlines(), 1)
        if "P.field(" in line or "P.number(" in line or "protocol.field(" in line
    ]
    assert lookups == []


def test_formatter_decides_the_layout():
    skips = sum(text.count("# fmt: skip") for _, _, text in sources(RUNTIME))
    assert skips < MAX_FMT_SKIP
