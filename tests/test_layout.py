"""The shape of lib: one subpackage per concern, each importing only from itself or from packages below it.

Packages, bottom to top (docs/architecture.md says what each module holds):

- ``common``: parts both papers share (data, corruptions, backbones, metrics, the registry, caches);
- ``ot``: entropic optimal transport (Sinkhorn solvers, costs, the Eq. 6 discretisation, epsilon);
- ``roda`` and ``dpdl``: the two papers' methods; neither imports the other, and neither imports experiment glue;
- ``experiments``: profiles and settings, runners, the executor, the drifting line, the CLI;
- ``reporting``: figures, claims and the paper-vs-ours verdicts.

The packages are read from the folders under ``lib/``; a new folder must be given a rank in :data:`RANK`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "lib"
MAX_LINES = 500

#: package -> rank; a package may import packages of a lower rank (and itself), never its equals or those above
RANK = {"common": 0, "ot": 1, "roda": 2, "dpdl": 2, "experiments": 3, "reporting": 4}


def packages() -> list[str]:
    return sorted(p.name for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def modules() -> list[str]:
    """Every module of lib as ``package.module`` (``__init__`` included: a package's docstring is code too)."""
    return sorted(f"{p.parent.name}.{p.stem}" for p in LIB.glob("*/*.py"))


def lib_imports(path: Path) -> set[str]:
    """The lib packages that the file at ``path`` imports anywhere (module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import; lib uses absolute imports (from lib.<package>...)")
            if node.module == "lib":
                names = [f"lib.{alias.name}" for alias in node.names]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lib" and len(parts) > 1:
                found.add(parts[1])
    return found


def allowed(importer: str, imported: str) -> bool:
    return importer == imported or RANK[imported] < RANK[importer]


def test_every_package_has_a_rank():
    missing = [p for p in packages() if p not in RANK]
    assert not missing, f"lib packages without a rank: {missing}; add each to RANK in tests/test_layout.py"


def test_no_loose_modules_at_the_top():
    loose = sorted(p.name for p in LIB.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules directly under lib/: {loose}; move each into the package it belongs to"


@pytest.mark.parametrize("module", modules())
def test_no_import_from_a_package_at_or_above(module):
    package, name = module.split(".")
    imported = lib_imports(LIB / package / f"{name}.py")
    unknown = sorted(imported - set(RANK) - {"__version__"})
    assert not unknown, f"lib/{package}/{name}.py imports lib.{unknown[0]}, which is not a package"
    bad = sorted(p for p in imported & set(RANK) if not allowed(package, p))
    assert not bad, (f"lib/{package}/{name}.py imports lib.{', lib.'.join(bad)}: a package may import only "
                     "from itself or from the packages below it (docs/architecture.md); move the shared piece down")


@pytest.mark.parametrize("module", modules())
def test_module_size(module):
    package, name = module.split(".")
    n = len((LIB / package / f"{name}.py").read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"lib/{package}/{name}.py has {n} lines (> {MAX_LINES}): split it by what it holds"


# ---------------------------------------------------------------- the checker itself, on known cases

def test_import_parser_sees_every_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom lib.common import data, metrics\nfrom lib.ot.sinkhorn import x\n"
                   "import lib.roda.patchcore\nfrom lib import dpdl\n\n"
                   "def f():\n    from lib.experiments.cli import z\n")
    assert lib_imports(src) == {"common", "ot", "roda", "dpdl", "experiments"}
    src.write_text("from .data import x\n")
    with pytest.raises(AssertionError, match="relative import"):
        lib_imports(src)


def test_rank_rules_on_known_cases():
    assert allowed("roda", "ot") and allowed("roda", "common") and allowed("reporting", "experiments")
    assert not allowed("roda", "experiments")  # algorithms never import experiment glue
    assert not allowed("roda", "dpdl") and not allowed("dpdl", "roda")  # the papers stay apart
    assert not allowed("common", "ot") and allowed("experiments", "roda")


def test_lib_itself_is_checked():
    assert set(packages()) == set(RANK), "RANK names a package that is not a folder, or misses one"
    assert len(modules()) > 30 and sys.modules.get(__name__)
