"""docs/architecture.md names every lib module, and every module it names exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"


def named_modules() -> set[str]:
    return set(re.findall(r"`lib/(\w+/\w+)\.py`", DOC.read_text(encoding="utf-8")))


def test_every_lib_module_is_described():
    modules = {f"{p.parent.name}/{p.stem}" for p in (REPO / "lib").glob("*/*.py") if p.stem != "__init__"}
    missing = sorted(modules - named_modules())
    assert not missing, f"add a line for {missing} to the module table of docs/architecture.md"


def test_every_described_module_exists():
    stale = sorted(m for m in named_modules() if not (REPO / "lib" / f"{m}.py").exists())
    assert not stale, f"docs/architecture.md describes modules that do not exist: {stale}"


def test_extending_names_real_places():
    text = (REPO / "docs" / "extending.md").read_text(encoding="utf-8")
    from lib.common import registry

    for name in ("EXTRA_CORRUPTIONS", "METHOD_TABLES", "LOADER_KINDS", "TASKS"):
        assert hasattr(registry, name)
    assert "RODA_PAIRS" in text and "registry" in text
