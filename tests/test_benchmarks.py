"""What benchmarks/README.md promises of every benchmark: it leaves nothing behind.

Each temporary folder a benchmark makes is in the system's temp folder (never Proctor's
home) and is removed in a `finally`, whatever the run did. Checked on the source, since
a run of each takes minutes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _name(node: ast.AST) -> str:
    return ast.unparse(node)


def _scratch_folders(tree: ast.AST) -> list[tuple[ast.Call, str]]:
    """(the mkdtemp call, what it is assigned to) for every `tempfile.mkdtemp(...)`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            calls = [c for c in ast.walk(node.value) if isinstance(c, ast.Call) and _name(c.func) == "tempfile.mkdtemp"]
            found += [(c, _name(node.targets[0])) for c in calls]
    return found


def _removes(statements: list[ast.stmt], target: str) -> bool:
    return any(isinstance(call, ast.Call) and _name(call.func) == "shutil.rmtree" and call.args
               and _name(call.args[0]) == target for stmt in statements for call in ast.walk(stmt))


def _removed(tree: ast.AST, target: str) -> bool:
    """In a `finally`, or, for an object's folder (`self.home`), in the object's `close`
    (whose callers close it in a `finally`)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and _removes(node.finalbody, target):
            return True
        if (target.startswith("self.") and isinstance(node, ast.FunctionDef) and node.name == "close"
                and _removes(node.body, target)):
            return True
    return False


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_a_benchmark_removes_every_folder_it_makes(path: Path) -> None:
    source = path.read_text()
    assert "/var/lib/proctor" not in source, f"{path.name} writes into Proctor's home"
    tree = ast.parse(source)
    for call, target in _scratch_folders(tree):
        assert not any(k.arg == "dir" for k in call.keywords), f"{path.name}: {target} is made outside the temp folder"
        assert _removed(tree, target), f"{path.name}: {target} is not removed in a finally"
