"""The package layout is the architecture: imports flow one way, no module is a grab bag, nothing is written twice.

Imports are read from the source with ``ast`` (every import, including those inside functions, where a
cycle would otherwise hide), so these tests need no import side effects.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import diffusers_svdquant

PACKAGE = Path(diffusers_svdquant.__file__).parent
ROOT = PACKAGE.name
APPS = f"{ROOT}.apps"
NATIVE = f"{ROOT}._C"  # the compiled extension: a leaf, imported by ops.native alone
MAX_LINES = 500
REPEAT_LINES = 6


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _raw_imports(name: str) -> set[str]:
    """Every dotted name ``name`` imports: the module named, or for ``from X import y`` the module ``X.y``
    when that is one (a submodule or the extension), else ``X``."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    here = name if _is_package(name) else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                targets.add(sub if sub in MODULES or sub == NATIVE else module)
    return targets


def _imports(name: str) -> set[str]:
    """The package modules ``name`` imports, plus the packages Python initialises on the way there
    (those that are not also ``name``'s own ancestors, which are initialised before it anyway)."""
    ancestors = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}
    found = set()
    for t in _raw_imports(name):
        if t not in MODULES:
            continue
        found.add(t)
        parts = t.split(".")
        found.update(p for i in range(2, len(parts)) if (p := ".".join(parts[:i])) in MODULES and p not in ancestors)
    found.discard(name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def test_the_graph_sees_the_packages_imports():
    """The walker resolves relative imports (guards the other tests against passing on an empty graph)."""
    assert f"{ROOT}.ops" in GRAPH[f"{ROOT}.linear"]
    assert f"{ROOT}.config" in GRAPH[f"{ROOT}.integrations.layers"]
    assert f"{ROOT}.calibration" in GRAPH[f"{ROOT}.integrations.layers"]  # the package, initialised on the way
    assert f"{ROOT}.hub" in GRAPH[f"{ROOT}.apps.calibration_commands"]  # an import inside a function
    assert sum(map(len, GRAPH.values())) > 2 * len(GRAPH)


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, f"{ROOT}.reference", GRAPH[f"{ROOT}.reference"] | {f"{ROOT}.linear"})
    assert _cycle() is not None


def test_only_ops_native_imports_the_extension():
    assert sorted(name for name in MODULES if NATIVE in _raw_imports(name)) == [f"{ROOT}.ops.native"]


def test_the_library_never_imports_an_app():
    offenders = {
        name: sorted(t for t in targets if t == APPS or t.startswith(APPS + "."))
        for name, targets in GRAPH.items()
        if not (name == APPS or name.startswith(APPS + "."))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_data_flows_one_way():
    """The runtime does not import calibration, the loaders or the hub; calibration does not import the loaders."""
    runtime = [f"{ROOT}.{m}" for m in ("config", "dtypes", "reference", "rounding", "algorithm", "linear", "metrics",
                                       "ops")]  # fmt: skip
    upper = (f"{ROOT}.integrations", f"{ROOT}.calibration", f"{ROOT}.hub", APPS)
    for name in runtime:
        assert not [t for t in GRAPH[name] if t.startswith(upper)], name
    for name in (n for n in MODULES if n.startswith(f"{ROOT}.calibration")):
        assert not [t for t in GRAPH[name] if t.startswith((f"{ROOT}.integrations", f"{ROOT}.hub", APPS))], name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (at most {MAX_LINES}): split it by idea"


def _significant_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, stripped line)`` of the lines the repeat check compares: not blank, not comments or
    punctuation alone, not import statements and not ``def`` headers (an op's signature mirrors the
    ``reference.py`` function it is checked against by design; the logic below it is what must not repeat)."""
    text = path.read_text()
    skip: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, node.end_lineno + 1))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            skip.update(range(node.lineno, node.body[0].lineno))
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if i not in skip and s and not s.startswith("#") and any(c.isalnum() for c in s):
            out.append((i, s))
    return out


def test_no_block_repeated():
    """No run of six significant lines appears twice in the package (one piece of code per idea)."""
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in MODULES.values():
        lines = _significant_lines(path)
        for j in range(len(lines) - REPEAT_LINES + 1):
            window = tuple(s for _, s in lines[j : j + REPEAT_LINES])
            seen[window].append(f"{path.relative_to(PACKAGE.parent)}:{lines[j][0]}")
    repeated = {w[0]: places for w, places in seen.items() if len(places) > 1}
    assert repeated == {}
