"""The main job leaves the checkout clean: `make run` writes under a folder git ignores."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def recipe(target: str) -> str:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, flags=re.M)
    assert match, f"no '{target}' target in the Makefile"
    return match.group(1)


def test_make_run_writes_under_an_ignored_folder():
    body = recipe("run")
    assert "scripts/run_notebooks.py" in body and "--profile default" in body
    out = re.search(r"--out-dir\s+(\S+)", body)
    assert out, "make run must pass --out-dir (without it, the run rewrites the committed results/default tables)"
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    probe = f"{out.group(1)}/results/default/02_patchcore.csv"
    ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO).returncode == 0
    assert ignored, f"{out.group(1)} is not ignored by git: make run would dirty the checkout"


def test_recipe_reader_sees_a_missing_target():
    with pytest.raises(AssertionError, match="no 'nosuch' target"):
        recipe("nosuch")
