"""scripts/render_readme.py: README tables regenerated from CSVs, and --check on a temporary README."""

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import render_readme as rr  # noqa: E402

MARKER = ("<!-- table: results/x.csv | columns=task,method,auroc | by=task,method | where=method:a,b "
          "| percent=auroc | digits=1 | rename=auroc:AUROC (%) -->")


@pytest.fixture
def readme(tmp_path):
    (tmp_path / "results").mkdir()
    pd.DataFrame(dict(task=["t"] * 6, method=["a", "a", "b", "b", "c", "c"], seed=[0, 1] * 3,
                      auroc=[0.80, 0.82, 0.70, 0.70, 0.5, 0.5])).to_csv(tmp_path / "results" / "x.csv", index=False)
    path = tmp_path / "README.md"
    path.write_text(f"# Title\n\ntext 1\n\n{MARKER}\nstale\n<!-- /table -->\n\nafter\n")
    return path


def test_render_writes_the_table_and_check_passes_after(readme):
    assert rr.main([str(readme), "--check"]) == 1
    assert rr.main([str(readme)]) == 0
    text = readme.read_text()
    assert "| task | method | AUROC (%) |" in text
    assert "| t | a | 81.0 ± 1.4 |" in text and "| t | b | 70.0 ± 0.0 |" in text
    assert "| t | c |" not in text and "stale" not in text
    assert text.startswith("# Title\n\ntext 1\n\n") and text.endswith("<!-- /table -->\n\nafter\n")
    assert rr.main([str(readme), "--check"]) == 0
    # idempotent
    before = readme.read_text()
    rr.main([str(readme)])
    assert readme.read_text() == before


def test_check_fails_when_the_csv_changes(readme, capsys):
    rr.main([str(readme)])
    csv = readme.parent / "results" / "x.csv"
    df = pd.read_csv(csv)
    df.loc[0, "auroc"] = 0.9
    df.to_csv(csv, index=False)
    assert rr.main([str(readme), "--check"]) == 1
    assert "results/x.csv" in capsys.readouterr().err


def test_plain_table_without_grouping(tmp_path):
    df = pd.DataFrame(dict(name=["x", "y"], value=[1.23456, 2.0], n=[3, 4]))
    table = rr.render_table(df, dict(columns=["name", "value", "n"], digits=3, where=[]))
    assert table.splitlines() == ["| name | value | n |", "| --- | --- | --- |", "| x | 1.235 | 3 |",
                                  "| y | 2.000 | 4 |"]


def test_errors_name_the_line_and_the_fix(readme):
    text = readme.read_text().replace("columns=task", "columns=tsk")
    with pytest.raises(rr.ReadmeError, match=r"line 5 .*'tsk'"):
        rr.render(text, readme.parent)
    with pytest.raises(rr.ReadmeError, match="does not exist"):
        rr.render(readme.read_text().replace("x.csv", "y.csv"), readme.parent)
    with pytest.raises(rr.ReadmeError, match="without"):
        rr.render(readme.read_text().replace("<!-- /table -->", ""), readme.parent)
    with pytest.raises(rr.ReadmeError, match="bad option"):
        rr.parse_spec("a.csv | colums=a")
    assert rr.main([str(readme.parent / "nope.md")]) == 2


def test_count_per_group():
    df = pd.DataFrame(dict(paper=["r", "r", "r", "d"], verdict=["x", "x", "y", "x"]))
    table = rr.render_table(df, dict(columns=["paper", "verdict", "n"], by=["paper", "verdict"], count="n",
                                     where=[]))
    assert table.splitlines()[2:] == ["| r | x | 2 |", "| r | y | 1 |", "| d | x | 1 |"]


def test_pivot_puts_one_method_per_column_in_the_where_order():
    df = pd.DataFrame(dict(task=["t", "t", "t", "u", "u"], method=["a", "a", "b", "b", "c"], seed=[0, 1, 0, 0, 0],
                           auroc=[0.80, 0.90, 0.70, 0.60, 0.5]))
    _, options = rr.parse_spec("x.csv | columns=task,method,auroc,n | by=task,method | count=n | pivot=method "
                               "| where=method:b,a | percent=auroc | digits=1")
    table = rr.render_table(df, options)
    assert table.splitlines()[0] == "| task | b | a |"
    assert table.splitlines()[2:] == ["| t | 70.0 (1) | 85.0 ± 7.1 (2) |", "| u | 60.0 (1) |  |"]
    with pytest.raises(rr.ReadmeError, match="exactly one value column"):
        rr.render_table(df.assign(other=1.0), dict(options, columns=["task", "method", "auroc", "other"]))


def test_the_readme_tables_match_their_csvs():
    """Numbers in the README's marked tables are read from the CSVs: rerun scripts/render_readme.py after a run."""
    repo = Path(__file__).resolve().parent.parent
    assert rr.main(["--check", str(repo / "README.md")]) == 0


def test_the_docs_tables_match_their_csvs():
    """The pages of docs/ carry markers too, their CSV paths relative to the repository (the default file list)."""
    repo = Path(__file__).resolve().parent.parent
    pages = sorted((repo / "docs").glob("*.md"))
    assert any("<!-- value:" in p.read_text(encoding="utf-8") for p in pages)
    assert rr.main(["--check", "--root", str(repo), *map(str, pages)]) == 0


def test_inline_values_are_read_from_the_csv(readme):
    text = ("A <!-- value: results/x.csv | where=method:a | column=auroc | percent=auroc | digits=1 -->0"
            "<!-- /value -->, "
            "B <!-- value: results/x.csv | where=method:a | column=auroc | agg=pm | percent=auroc | digits=1 -->?"
            "<!-- /value -->, n <!-- value: results/x.csv | where=method:b,c | column=auroc | agg=count -->9"
            "<!-- /value -->"
            ", d <!-- value: results/x.csv | where=method:c | column=auroc | agg=max | digits=2 | sign=1 -->x"
            "<!-- /value -->.\n")
    readme.write_text(readme.read_text() + text)
    assert rr.main([str(readme)]) == 0
    out = readme.read_text()
    assert "-->81.0<!-- /value -->" in out and "-->81.0 ± 1.4<!-- /value -->" in out
    assert "-->4<!-- /value -->" in out and "-->+0.50<!-- /value -->" in out
    assert rr.main([str(readme), "--check"]) == 0
    csv = readme.parent / "results" / "x.csv"
    df = pd.read_csv(csv)
    df.loc[df.method == "c", "auroc"] = -0.25
    df.to_csv(csv, index=False)
    assert rr.main([str(readme), "--check"]) == 1
    rr.main([str(readme)])
    assert "-->-0.25<!-- /value -->" in readme.read_text()


def test_inline_value_errors_name_the_fix():
    df = pd.DataFrame(dict(m=["a", "a", "b"], v=[1.0, 2.0, 3.0]))
    with pytest.raises(rr.ReadmeError, match="column=NAME"):
        rr.render_value(df, dict(where=[]))
    with pytest.raises(rr.ReadmeError, match="2 rows match: narrow where="):
        rr.render_value(df, dict(column="v", agg="only", where=[("m", ["a"])]))
    assert rr.render_value(df, dict(column="v", agg="only", where=[("m", ["b"])], digits=0)) == "3"
    with pytest.raises(rr.ReadmeError, match="check the filters"):
        rr.render_value(df, dict(column="v", where=[("m", ["z"])]))
    with pytest.raises(rr.ReadmeError, match="agg="):
        rr.render_value(df, dict(column="v", agg="avg", where=[]))
    with pytest.raises(rr.ReadmeError, match="bad option"):
        rr.parse_spec("a.csv | columns=v", rr.VALUE_KEYS)
    assert rr.render_value(df, dict(column="v", agg="min", absolute=1, where=[], digits=1)) == "1.0"


def test_inline_difference_between_two_row_sets():
    df = pd.DataFrame(dict(method=["roda", "roda", "pc", "pc"], cond=["n", "b", "n", "b"], v=[0.70, 0.40, 0.55, 0.60]))
    _, opts = rr.parse_spec("x.csv | where=method:roda | where=cond:n | column=v | agg=only | minus=method:pc "
                            "| percent=v | digits=1 | sign=1", rr.VALUE_KEYS)
    assert rr.render_value(df, opts) == "+15.0"
    _, opts = rr.parse_spec("x.csv | where=method:roda | column=v | minus=method:pc | percent=v | digits=1",
                            rr.VALUE_KEYS)
    assert rr.render_value(df, opts) == "-2.5"  # mean 55.0 minus mean 57.5
    with pytest.raises(rr.ReadmeError, match="not allowed"):
        rr.render_value(df, dict(opts, agg="count"))


def test_pivot_rows_keep_the_order_of_appearance():
    df = pd.DataFrame(dict(task=["z", "z", "a"], method=["m", "n", "m"], auroc=[0.1, 0.2, 0.3]))
    _, options = rr.parse_spec("x.csv | columns=task,method,auroc | by=task,method | pivot=method | digits=1")
    assert [line.split(" | ")[0] for line in rr.render_table(df, options).splitlines()[2:]] == ["| z", "| a"]


def test_inline_range_over_group_means_and_rank_correlation():
    # two rows x two seeds: row means 0.3 and 0.8, while single seeds span 0.1-0.9
    df = pd.DataFrame(dict(row=["a", "a", "b", "b"], seed=[0, 1, 0, 1], v=[0.1, 0.5, 0.7, 0.9], w=[1, 2, 3, 4]))
    _, lo = rr.parse_spec("x.csv | by=row | column=v | agg=min | percent=v | digits=0", rr.VALUE_KEYS)
    _, hi = rr.parse_spec("x.csv | by=row | column=v | agg=max | percent=v | digits=0", rr.VALUE_KEYS)
    assert (rr.render_value(df, lo), rr.render_value(df, hi)) == ("30", "80")
    assert rr.render_value(df, dict(lo, by=None)) == "10"  # without by= the single rows
    _, rho = rr.parse_spec("x.csv | column=v | agg=spearman | against=w", rr.VALUE_KEYS)
    assert rr.render_value(df, rho) == "1.00"
    df2 = df.assign(w=[4, 1, 3, 2])  # ranks of v 1,2,3,4 against 4,1,3,2: rho = 1 - 6*14/60 = -0.4
    assert rr.render_value(df2, rho) == "-0.40"
    with pytest.raises(rr.ReadmeError, match="go together"):
        rr.render_value(df, dict(rho, against=None))
    with pytest.raises(rr.ReadmeError, match="at least 3 rows"):
        rr.render_value(df, dict(rho, by=["row"]))
    with pytest.raises(rr.ReadmeError, match="by: no column"):
        rr.render_value(df, dict(lo, by=["task"]))


def test_latest_keeps_the_newest_rows_after_where():
    # a timings log: the same notebooks measured again in later releases; 2.10 is newer than 2.9 (natural order)
    df = pd.DataFrame(dict(version=["2.5", "2.5", "2.9", "2.9", "2.10", "2.10", "2.9"],
                           profile=["d", "d", "d", "d", "r", "r", "r"], notebook=["a", "b", "a", "b", "a", "b", "c"],
                           minutes=[1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 99.0]))
    _, total = rr.parse_spec("t.csv | where=profile:d | latest=version | column=minutes | agg=sum | digits=1",
                             rr.VALUE_KEYS)
    assert rr.render_value(df, total) == "7.0"  # 3 + 4 of 2.9, not 1 + 2 of 2.5 nor the profile-r rows
    _, real = rr.parse_spec("t.csv | where=profile:r | latest=version | column=minutes | agg=sum | digits=1",
                            rr.VALUE_KEYS)
    assert rr.render_value(df, real) == "30.0"  # 2.10 after 2.9 (text order would pick 2.9 and give 99.0)
    _, only_c = rr.parse_spec("t.csv | where=notebook:c | latest=version | column=minutes | agg=only | digits=1",
                              rr.VALUE_KEYS)
    assert rr.render_value(df, only_c) == "99.0"  # the newest row of what where= kept, not of the whole file
    assert rr.render_value(df, dict(total, latest=None)) == "10.0"  # without latest=: every profile-d row
    _, table = rr.parse_spec("t.csv | columns=notebook,minutes | where=profile:d | latest=version | digits=1")
    assert rr.render_table(df, table).splitlines()[2:] == ["| a | 3.0 |", "| b | 4.0 |"]
    with pytest.raises(rr.ReadmeError, match="latest: no column 'date'"):
        rr.render_value(df, dict(total, latest="date"))
    dates = pd.DataFrame(dict(date=["2026-11-30", "2026-12-01", "2026-12-01"], v=[1.0, 2.0, 4.0]))
    assert rr.render_value(dates, dict(column="v", latest="date", where=[], digits=1)) == "3.0"


def test_markers_inside_fenced_code_are_examples(readme):
    example = ("```markdown\n<!-- table: results/nope.csv | columns=a -->\n<!-- /table -->\n"
               "<!-- value: results/nope.csv | column=a -->1<!-- /value -->\n```\n")
    readme.write_text(example + readme.read_text())
    assert rr.main([str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(example) and "| t | a | 81.0 ± 1.4 |" in text  # example untouched, table rendered
    with pytest.raises(rr.ReadmeError, match="line 10 .*'tsk'"):  # the fenced lines still count
        rr.render(text.replace("columns=task", "columns=tsk"), readme.parent)


def test_every_marker_names_a_file_that_exists():
    """Each table and value marker of the README and of docs/*.md (outside fenced examples) names a CSV that is in
    the repository: after results are renamed or deleted, a stale marker is found here by name, all at once."""
    repo = Path(__file__).resolve().parent.parent
    missing = []
    for page in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        text = rr.FENCE.sub("", page.read_text(encoding="utf-8"))
        specs = [m.group("spec") for m in rr.START.finditer(text)] + [m.group("spec") for m in rr.VALUE.finditer(text)]
        assert specs or page.name != "README.md", "the README has no markers: did the marker syntax change?"
        for spec in specs:
            path = " ".join(spec.split()).split("|")[0].strip()
            if not (repo / path).is_file():
                missing.append(f"{page.relative_to(repo)}: {path}")
    assert not missing, "markers naming files that do not exist:\n" + "\n".join(sorted(set(missing)))
