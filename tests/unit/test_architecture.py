"""The package's shape: no import cycle between qbd's modules (imports inside functions count: a
lazy import is still a dependency; so does a module loaded by its full name), and no module past
the size where it holds more than one concern."""

import ast
from pathlib import Path

QBD = Path(__file__).resolve().parents[2] / "qbd"
# the largest modules today, each one concern (sandbox.py: running a defense under a time limit;
# evaluate.py: the bench): a module growing past this splits (the aim is about 450)
MAX_LINES = 470


def _module(path: Path) -> str:
    parts = path.relative_to(QBD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in QBD.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from qbd import rates` names the module qbd.rates; `from qbd.x import y` the module qbd.x
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
                targets = [node.value]  # a module loaded by name (importlib.import_module("qbd.zoo.cli"))
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "qbd":
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_qbd_modules():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_holds_more_than_one_concern_by_size():
    big = {str(p.relative_to(QBD.parent)): n for p in QBD.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}, f"split these by concern: {big}"


def test_the_sandboxs_old_names_say_where_they_went():
    import pytest

    with pytest.raises(ImportError, match=r"moved to qbd\.defenses\.sandbox\.run_defense"):
        from qbd.defenses.base import run_defense  # noqa: F401
