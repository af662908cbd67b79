"""The structure the code keeps (docs/architecture.md): layers, sizes, and who may change a request.

Read from the source with ``ast``, nothing is imported or run: these hold for every module,
including code paths the other tests do not reach.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNTIME = ("ipc", "contexts", "backends", "http_front", "scheduler", "console")
PACKAGES = (*RUNTIME, "benchmarks")
# Which of our packages each package may import: a layered DAG, so no circle is possible.
MAY_IMPORT = {
    "ipc": set(),
    "contexts": {"ipc"},
    "backends": {"ipc", "contexts"},
    "http_front": {"ipc"},  # a client of the agent socket, like any agent
    "scheduler": {"ipc", "http_front"},  # ``serve --http`` starts the front in the daemon's loop
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


def module_imports(rel: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The modules of ours a file imports anywhere in it (TYPE_CHECKING and function bodies too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m in known} - {module_name(rel)}


def module_name(rel: str) -> str:
    return rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def test_no_file_imports_its_importer():
    """No circle of files, even through type hints: a size cap is never met by moving code into a
    file that imports its owner (what a class split by its methods does)."""
    files = {module_name(rel): (rel, tree) for rel, tree, _ in sources(RUNTIME)}
    graph = {m: module_imports(rel, tree, set(files)) for m, (rel, tree) in files.items()}
    circles = [sorted(c) for c in strongly_connected(graph) if len(c) > 1]
    assert circles == []


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.add(m)
                    if m == node:
                        break
                out.append(comp)
    return out


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


def attribute_writes(tree: ast.Module, names: set[str], attrs: set[str] | None = None) -> list[tuple[int, str]]:
    """``NAME.attr = ...`` (plain, augmented, annotated, in a tuple) and ``setattr(NAME, ...)`` in a file:
    (line, what) for each, where NAME is one of ``names`` (and attr one of ``attrs``, when given)."""
    out = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            for el in t.elts if isinstance(t, ast.Tuple) else [t]:
                if isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name) and el.value.id in names:
                    if attrs is None or el.attr in attrs:
                        out.append((el.lineno, f"{el.value.id}.{el.attr}"))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
            if getattr(node.args[0], "id", None) in names:
                out.append((node.lineno, "setattr"))
    return out


def test_requests_change_only_through_the_scheduler():
    """As in nano-vllm: every change of a request's state goes through the scheduler core or the request."""
    writes = [
        f"{rel}:{line} {what}"
        for rel, tree, _ in sources(RUNTIME)
        if rel not in REQUEST_OWNERS
        for line, what in attribute_writes(tree, REQUEST_NAMES)
    ]
    assert writes == []


SEQUENCE_NAMES = {"seq", "row", "s", "leader"}  # what the engines call a Sequence
SEQUENCE_OWNERS = {  # the engines that run rows, and the prefill line that feeds them
    "backends/sequence.py",
    "backends/local.py",
    "backends/prefill.py",
    "backends/hf_engine.py",
    "backends/llamacpp_engine.py",
}


def test_sequences_change_only_in_the_engine():
    """As for requests: a row's fields are written by the engine and its prefill line; helpers (adoption,
    migration, sessions, the KV sources) go through ``Sequence``'s methods."""
    fields = sequence_fields()
    writes = [
        f"{rel}:{line} {what}"
        for rel, tree, _ in sources(("backends",))
        if rel not in SEQUENCE_OWNERS
        for line, what in attribute_writes(tree, SEQUENCE_NAMES, fields)
    ]
    assert writes == []


def sequence_fields() -> set[str]:
    tree = ast.parse((REPO / "backends/sequence.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Sequence")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


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
