"""docs/equations.md: every equation of both papers has a row, and every function and test it names exists."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "equations.md"


def _defined(path: Path) -> set[str]:
    """Top-level functions and classes of a module, and ``Class.method`` for the methods of its classes."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{item.name}" for item in node.body
                      if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_every_named_function_and_test_exists():
    text = DOC.read_text(encoding="utf-8")
    code = re.findall(r"`(lib/[\w/]+\.py):([\w.]+)`", text)
    tests = re.findall(r"`(tests/\w+\.py)::(\w+)`", text)
    assert len(code) > 30 and len(tests) > 30
    missing = [f"{path}:{name}" for path, name in code
               if not (REPO / path).is_file() or name not in _defined(REPO / path)]
    missing += [f"{path}::{name}" for path, name in tests
                if not (REPO / path).is_file() or name not in _defined(REPO / path)]
    assert not missing, f"docs/equations.md names what does not exist (renamed or moved?): {missing}"


def test_every_equation_has_a_row():
    rows = [line.split("|")[1].strip() for line in DOC.read_text(encoding="utf-8").splitlines()
            if line.startswith("| Eq") or line.startswith("| Alg")]
    numbers = set()
    for row in rows:
        if row.startswith("Alg"):
            numbers.add("Alg. 1")
        for a, b in re.findall(r"(\d+)(?:-(\d+))?", row.split(",")[0]):
            numbers |= {str(n) for n in range(int(a), int(b or a) + 1)}
    roda = {str(n) for n in range(2, 7)} | {"Alg. 1"}
    dpdl = {str(n) for n in range(8, 23)}
    assert not (roda | dpdl) - numbers, f"no row for {sorted((roda | dpdl) - numbers)}"
