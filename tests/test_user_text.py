"""User-facing text describes the project as it is: the README is an entry point, and no version tags, issue
numbers, "lead N" or "superseded" appear in the README, docs/, lib/, the notebooks, scripts/ or benchmarks/
(the history is in CHANGELOG.md; rendered notebooks and benchmark outputs are records, not text)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HISTORY = re.compile(r"issue #?[0-9]+|\blead [0-9]\b|\bv0\.[0-9]+\b|superseded", re.I)


def user_text_files() -> list[Path]:
    files = [REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "lib").rglob("*.py"),
             *(REPO / "notebooks").glob("*.ipynb"), *(REPO / "scripts").rglob("*"),
             *(REPO / "benchmarks").glob("*.py"), *(REPO / "benchmarks").glob("*.sh")]
    return [f for f in files if f.is_file() and "__pycache__" not in f.parts]


def test_no_history_in_user_text():
    hits = []
    for path in user_text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {HISTORY.search(line).group(0)!r}")
    assert not hits, "history belongs in CHANGELOG.md; say what the project is now:\n" + "\n".join(hits[:30])


def test_the_pattern_finds_what_it_should():
    for text in ("as of v0.9 it", "Issue 12's bar", "issue #13", "Lead 1 alone", "the superseded tables"):
        assert HISTORY.search(text), text
    for text in ("v0.x", "L1_eps_plan_spread", "leads = {}", "the 08_lead_grid.csv table", "version 0.11.0"):
        assert not HISTORY.search(text), text


def test_the_readme_is_an_entry_point():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail into docs/ (at most 250)"
    text = "\n".join(lines)
    for page in ("docs/equations.md", "CHANGELOG.md", "make test-fast", "make run"):
        assert page in text, f"README.md should name {page}"
