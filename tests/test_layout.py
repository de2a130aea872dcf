"""The shape of lib: every module sits in one layer and imports only from its own layer or those below it.

Layers, bottom to top (docs/architecture.md says what each module holds):

- ``base``: shared parts both papers use (data, corruptions, backbones, metrics, the registry, caches);
- ``algorithms``: the methods (PatchCore, Sinkhorn/OT, alignment losses, adaptation, DPDL and the open-set
  baselines); algorithms never import experiment glue;
- ``runners``: experiment glue that turns profiles into result tables (RoDA and open-set runners, grid, CLI);
- ``reporting``: figures and the paper-vs-ours fidelity verdicts.

``config`` (the run profiles) is not a layer of its own: it may import ``base`` and is importable by runners
and reporting only, so algorithms stay free of run settings.

A new module must be added to :data:`LAYERS` below (and to docs/architecture.md); the test says so.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "lib"
MAX_LINES = 500

#: layer -> modules. Names of modules that other branches are adding are listed already, so that a merge
#: only has to add what is new.
LAYERS = {
    "base": ("utils", "data", "synthetic", "corruptions", "backbones", "metrics", "registry", "cache", "download",
             "folders", "openset", "backbone_registry", "weight_ports"),
    "algorithms": ("patchcore", "transport", "sinkhorn", "eps_calibration", "alignment", "bn_stats", "adaptation",
                   "stream", "dpdl", "prototypes",
                   "openset_training", "openset_maps", "openset_baselines"),
    "runners": ("pipeline", "roda_runner", "openset_runner", "line", "grid", "cli"),
    "reporting": ("figures", "claims", "fidelity"),
    "config": ("profiles", "settings"),
}
ORDER = ("base", "algorithms", "runners", "reporting")
#: who may import a config module
CONFIG_USERS = ("config", "runners", "reporting")


def layer_of(module: str) -> str | None:
    return next((layer for layer, mods in LAYERS.items() if module in mods), None)


def lib_modules() -> list[str]:
    return sorted(p.stem for p in LIB.glob("*.py") if p.stem != "__init__")


def lib_imports(module: str) -> set[str]:
    """The lib modules that ``module`` imports anywhere in its source (module level or inside functions)."""
    tree = ast.parse((LIB / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "lib" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").split(".")[0] == "lib"):
            parts = (node.module or "").split(".")
            parts = parts[1:] if node.level == 0 else parts
            if parts and parts[0]:
                found.add(parts[0])
            else:  # from . import x, y / from lib import x
                found.update(alias.name for alias in node.names)
    return found - {module}


def allowed(importer: str, imported: str) -> bool:
    a, b = layer_of(importer), layer_of(imported)
    if b == "config":
        return a in CONFIG_USERS
    if a == "config":
        return b == "base"
    return ORDER.index(b) <= ORDER.index(a)


def test_every_module_has_a_layer():
    missing = [m for m in lib_modules() if layer_of(m) is None]
    assert not missing, (f"lib modules without a layer: {missing}. Add each to LAYERS in tests/test_layout.py "
                         "(base / algorithms / runners / reporting / config) and describe it in docs/architecture.md")


def test_layer_table_names_each_module_once():
    names = [m for mods in LAYERS.values() for m in mods]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("module", lib_modules())
def test_no_import_from_a_layer_above(module):
    if layer_of(module) is None:
        pytest.skip("no layer (see test_every_module_has_a_layer)")
    bad = sorted(m for m in lib_imports(module) if layer_of(m) is not None and not allowed(module, m))
    assert not bad, (f"lib/{module}.py ({layer_of(module)}) imports {', '.join(f'{m} ({layer_of(m)})' for m in bad)}: "
                     "a module may import only from its own layer or below (profiles: runners and reporting only); "
                     "move the shared piece down a layer")


@pytest.mark.parametrize("module", lib_modules())
def test_module_size(module):
    n = len((LIB / f"{module}.py").read_text(encoding="utf-8").splitlines())
    hint = "split it into modules named for what they hold"
    assert n <= MAX_LINES, f"lib/{module}.py has {n} lines (> {MAX_LINES}): {hint}"


# ---------------------------------------------------------------- the checker itself, on known cases

def test_import_parser_sees_every_form(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text(
        "import os\nfrom . import data, metrics\nfrom .utils import x\nimport lib.registry\nfrom lib.cache import y\n"
        "from lib import patchcore\n\ndef f():\n    from .pipeline import z\n")
    monkeypatch.setattr(sys.modules[__name__], "LIB", tmp_path)
    assert lib_imports("m") == {"data", "metrics", "utils", "registry", "cache", "patchcore", "pipeline"}


def test_layer_rules_on_known_cases():
    assert allowed("adaptation", "alignment") and allowed("fidelity", "claims") and allowed("pipeline", "data")
    assert not allowed("adaptation", "pipeline")  # algorithms never import experiment glue
    assert not allowed("data", "patchcore")
    assert allowed("pipeline", "profiles") and allowed("fidelity", "profiles")
    assert not allowed("adaptation", "profiles") and not allowed("data", "profiles")
    assert allowed("profiles", "data") and not allowed("profiles", "pipeline")
