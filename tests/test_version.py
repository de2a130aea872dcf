"""One version number: pyproject.toml, lib.__version__ and the newest entry of CHANGELOG.md agree."""

import re
from pathlib import Path

import lib

REPO = Path(__file__).resolve().parent.parent


def changelog_versions() -> list[str]:
    return re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", (REPO / "CHANGELOG.md").read_text(encoding="utf-8"), re.M)


def test_one_version_everywhere():
    project_table = (REPO / "pyproject.toml").read_text(encoding="utf-8").split("[project]", 1)[1].split("\n[", 1)[0]
    project = re.search(r'^version\s*=\s*"([^"]+)"', project_table, re.M).group(1)
    versions = changelog_versions()
    assert versions, "CHANGELOG.md needs entries headed '## X.Y.Z ...', newest first"
    assert project == lib.__version__ == versions[0], (
        f"pyproject.toml says {project}, lib/__init__.py {lib.__version__}, CHANGELOG.md's newest entry {versions[0]}: "
        "set all three to the release being made")


def test_changelog_is_newest_first_without_repeats():
    key = [tuple(int(p) for p in v.split(".")) for v in changelog_versions()]
    assert key == sorted(key, reverse=True), "CHANGELOG.md: entries newest first"
    assert len(set(key)) == len(key), "CHANGELOG.md: one entry per version"
