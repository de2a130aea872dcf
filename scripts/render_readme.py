#!/usr/bin/env python
"""Regenerate the README's result tables and prose numbers from the CSVs they come from, or check that they are
current.

A table in the README sits between two markers; the first names the CSV (relative to the README's folder)
and how to show it, options separated by ``|``::

    <!-- table: results/real_full/03_roda.csv | columns=task,method,condition,image_auroc | by=task,method,condition
         | where=method:patchcore,roda | percent=image_auroc | digits=1 | rename=image_auroc:image AUROC (%) -->
    | task | method | ... |            <- everything up to the end marker is replaced
    <!-- /table -->

Options (all optional):

- ``columns=a,b,c``: the columns shown, in this order (default: all);
- ``where=col:v1,v2``: keep rows whose ``col`` is one of the values (repeat the option for more columns);
- ``latest=col``: of the rows ``where`` kept, only those whose ``col`` holds the newest value (the largest in
  natural order, digit runs compared as numbers: ``2.10`` after ``2.9``, ISO dates in date order), so a marker
  follows the most recent measurement appended to a log such as ``benchmarks/results/notebook_timings.csv``;
- ``by=a,b``: one row per group; the other shown columns become ``mean ± std`` over the group's rows
  (e.g. seeds), or the mean alone when the group has one row;
- ``percent=a,b``: multiply these columns by 100 (AUROCs stored as fractions);
- ``digits=N``: decimals of numbers (default 2);
- ``count=name``: with ``by``, a column ``name`` with the number of rows of each group (list it in ``columns``);
- ``sort=a,b``: sort rows by these columns (default: the CSV's order, groups in order of appearance);
- ``rename=a:new name,b:other``: header labels;
- ``pivot=col``: with ``by`` (which lists ``col``) and one value column, one table column per value of
  ``col`` (in the order of its ``where`` list, else of appearance), each cell ``mean ± std (n)`` with ``n``
  the group's row count when ``count`` is set.

A number in prose sits between two inline markers (the number itself on one line); the first names the CSV, the rows
(``where=``, as above), the column and how the rows reduce to one number::

    PatchCore falls to <!-- value: results/real_full/02_patchcore.csv | where=condition:contrast | column=pixel_auroc
    | agg=mean | percent=pixel_auroc | digits=1 -->72.9<!-- /value --> under contrast

- ``column=name`` (required): the column read; ``agg=``: ``mean`` (default), ``std`` (ddof 1), ``min``, ``max``,
  ``median``, ``sum``, ``count``, ``only`` (the rows must hold exactly one value: an error otherwise), or
  ``pm`` (``mean ± std``); ``latest=col``, ``percent=name`` and ``digits=N`` as for tables; ``sign=1`` prints
  ``+`` before a positive number; ``absolute=1`` prints its absolute value (for prose that says "below" or "lost");
  ``minus=col:value`` subtracts the same number computed with ``where=col:value`` in place of the marker's
  own ``where`` on ``col`` (a difference such as "RoDA minus PatchCore": ``where=method:roda |
  minus=method:patchcore``);
- ``by=a,b``: the rows first reduce to one mean per group (e.g. the seeds of each table row), then ``agg``
  runs over those means (``by=row | agg=min``: the lowest row mean, as in a range "37-52" of a table's rows);
- ``agg=spearman | against=other``: the Spearman rank correlation of ``column`` with the column ``other``
  over the selected rows (after ``by``, over the group means).

``python scripts/render_readme.py`` rewrites the README and every page of ``docs/`` in place (atomically; CSV paths
relative to the repository); ``python scripts/render_readme.py FILE ...`` only those files, CSV paths relative to
each file's folder unless ``--root`` names another. ``--check`` writes nothing and exits 1 naming each table that
differs from its CSV (for the test command). A missing CSV or column is an error naming the marker's line.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import pandas as pd

START = re.compile(r"<!--\s*table:\s*(?P<spec>.*?)\s*-->", re.S)
END = "<!-- /table -->"
VALUE = re.compile(r"<!--\s*value:\s*(?P<spec>[^>]*?)\s*-->(?P<body>[^<\n]*)<!-- /value -->")
TABLE_KEYS = ("columns", "where", "latest", "by", "count", "percent", "digits", "sort", "rename", "pivot")
VALUE_KEYS = ("where", "latest", "column", "agg", "percent", "digits", "sign", "absolute", "minus", "by", "against")
AGGREGATES = ("mean", "std", "min", "max", "median", "sum", "count", "only", "pm", "spearman")


REPO = Path(__file__).resolve().parent.parent


class ReadmeError(ValueError):
    pass


def parse_spec(spec: str, keys=TABLE_KEYS) -> tuple[str, dict]:
    """(csv path, options) of a marker's text ``path | key=value | ...`` (``keys``: the options allowed)."""
    parts = [p.strip() for p in " ".join(spec.split()).split("|")]
    path, options = parts[0], {"where": []}
    for part in parts[1:]:
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in keys:
            raise ReadmeError(f"bad option {part!r}: use " + ", ".join(f"{k}=" for k in keys))
        if key == "where":
            column, _, values = value.partition(":")
            options["where"].append((column.strip(), [v.strip() for v in values.split(",")]))
        elif key in ("count", "pivot", "column", "agg", "against", "latest"):
            options[key] = value.strip()
        elif key == "minus":
            column, _, other = value.partition(":")
            options["minus"] = (column.strip(), other.strip())
        elif key in ("digits", "sign", "absolute"):
            options[key] = int(value)
        elif key == "rename":
            pairs = [p.split(":", 1) for p in value.split(",") if ":" in p]
            options["rename"] = {old.strip(): new.strip() for old, new in pairs}
        else:
            options[key] = [v.strip() for v in value.split(",") if v.strip()]
    return path, options


def _number(value, digits: int) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.{digits}f}"
    return str(value)


def _natural_key(value) -> tuple:
    """Sort key of ``value`` as text with its digit runs compared as numbers (``v2.10`` after ``v2.9``)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", str(value)) if part)


def _select(df: pd.DataFrame, where, latest: str | None = None) -> pd.DataFrame:
    """The rows of ``df`` whose column ``c`` is one of the values, for every ``(c, values)`` of ``where``; with
    ``latest``, of those only the rows whose column ``latest`` holds the newest value (:func:`_natural_key`)."""
    for column, values in where:
        if column not in df.columns:
            raise ReadmeError(f"where: no column {column!r}; the CSV has {list(df.columns)}")
        df = df[df[column].astype(str).isin(values)]
    if latest:
        if latest not in df.columns:
            raise ReadmeError(f"latest: no column {latest!r}; the CSV has {list(df.columns)}")
        if not df.empty:
            newest = max(df[latest].astype(str), key=_natural_key)
            df = df[df[latest].astype(str) == newest]
    return df


def render_table(df: pd.DataFrame, options: dict) -> str:
    """The Markdown table of ``df`` shaped by ``options`` (see the module docstring)."""
    digits = options.get("digits", 2)
    df = _select(df, options.get("where", []), options.get("latest"))
    columns = options.get("columns") or list(df.columns)
    count = options.get("count") if options.get("by") else None
    missing = [c for c in columns + options.get("by", []) + options.get("percent", []) + options.get("sort", [])
               if c not in df.columns and c != count]
    if missing:
        raise ReadmeError(f"no column {missing}; the CSV has {list(df.columns)}")
    df = df.copy()
    for column in options.get("percent", []):
        df[column] = df[column].astype(float) * 100
    by = options.get("by")
    if by:
        values = [c for c in columns if c not in by and c != count]
        grouped = df.groupby(by, sort=False, dropna=False)
        rows = []
        for key, group in grouped:
            row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
            if count:
                row[count] = len(group)
            for c in values:
                v = pd.to_numeric(group[c], errors="coerce")
                if v.notna().any() and len(group) > 1:
                    row[c] = f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"
                elif v.notna().any():
                    row[c] = f"{v.mean():.{digits}f}"
                else:
                    row[c] = ", ".join(dict.fromkeys(map(str, group[c])))
            rows.append(row)
        df = pd.DataFrame(rows, columns=by + values + ([count] if count else []))
    if options.get("sort"):
        df = df.sort_values(options["sort"], kind="stable")
    if options.get("pivot"):
        df, columns = _pivot(df, options, columns, count)
    df = df[columns]
    names = options.get("rename", {})
    lines = ["| " + " | ".join(str(names.get(c, c)) for c in columns) + " |", "|" + " --- |" * len(columns)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_number(v, digits) for v in row) + " |")
    return "\n".join(lines)


def render_value(df: pd.DataFrame, options: dict) -> str:
    """One number of ``df`` reduced by ``options`` (module docstring: inline markers)."""
    agg, digits = options.get("agg", "mean"), options.get("digits", 2)
    if options.get("minus"):
        if agg not in ("mean", "median", "min", "max", "sum", "only"):
            raise ReadmeError(f"minus= needs one number per side: agg={agg} is not allowed with it")
        name, other = options["minus"]
        where = [(c, v) for c, v in options.get("where", []) if c != name]
        x = _reduce(df, options) - _reduce(df, dict(options, where=where + [(name, [other])]))
    else:
        x = _reduce(df, options)
    if isinstance(x, str):
        return x
    if options.get("absolute"):
        x = abs(x)
    text = f"{x:.{digits}f}"
    return f"+{text}" if options.get("sign") and x > 0 else text


def _reduce(df: pd.DataFrame, options: dict):
    """The marker's rows of ``df`` reduced to a float (or the finished text of ``count`` and ``pm``)."""
    column, agg, digits = options.get("column"), options.get("agg", "mean"), options.get("digits", 2)
    if not column:
        raise ReadmeError("a value marker needs column=NAME")
    if agg not in AGGREGATES:
        raise ReadmeError(f"agg={agg!r}: use one of {', '.join(AGGREGATES)}")
    if column not in df.columns:
        raise ReadmeError(f"no column {column!r}; the CSV has {list(df.columns)}")
    rows = _select(df, options.get("where", []), options.get("latest"))
    other = options.get("against")
    if (agg == "spearman") != bool(other):
        raise ReadmeError("agg=spearman and against=COLUMN go together")
    if other and other not in df.columns:
        raise ReadmeError(f"against: no column {other!r}; the CSV has {list(df.columns)}")
    if options.get("by"):
        missing = [c for c in options["by"] if c not in df.columns]
        if missing:
            raise ReadmeError(f"by: no column {missing}; the CSV has {list(df.columns)}")
        numeric = [c for c in (column, other) if c]
        rows = rows.assign(**{c: pd.to_numeric(rows[c], errors="coerce") for c in numeric})
        rows = rows.groupby(options["by"], sort=False)[numeric].mean().reset_index()
    if agg == "spearman":
        pair = rows[[column, other]].apply(pd.to_numeric, errors="coerce").dropna()
        if len(pair) < 3:
            raise ReadmeError(f"agg=spearman needs at least 3 rows with both columns, got {len(pair)}")
        return float(pair[column].corr(pair[other], method="spearman"))
    v = pd.to_numeric(rows[column], errors="coerce").dropna()
    if agg == "count":
        return str(len(v))
    if v.empty:
        raise ReadmeError(f"no number in column {column!r} of the rows selected by where=: check the filters")
    if agg == "only" and len(v) != 1:
        raise ReadmeError(f"agg=only but {len(v)} rows match: narrow where= or choose another agg")
    if column in options.get("percent", []):
        v = v.astype(float) * 100
    if agg == "pm":
        std = v.std(ddof=1) if len(v) > 1 else 0.0
        return f"{v.mean():.{digits}f} ± {std:.{digits}f}"
    if agg == "std":
        return float(v.std(ddof=1))
    if agg == "only":
        return float(v.iloc[0])
    return float(getattr(v, agg)())


def _pivot(df: pd.DataFrame, options: dict, columns: list, count) -> tuple[pd.DataFrame, list]:
    """The grouped ``df`` with one column per value of ``options["pivot"]`` (module docstring)."""
    pivot, by = options["pivot"], options.get("by") or []
    values = [c for c in columns if c not in by and c != count]
    if pivot not in by or len(values) != 1:
        raise ReadmeError(f"pivot={pivot} needs by= to list it and exactly one value column (got {values})")
    index = [c for c in by if c != pivot]
    order = next((v for c, v in options.get("where", []) if c == pivot), None) or list(dict.fromkeys(df[pivot]))
    cell = df[values[0]].astype(str)
    if count:
        cell = cell + " (" + df[count].astype(str) + ")"
    wide = df.assign(_cell=cell).pivot(index=index, columns=pivot, values="_cell")
    rows = list(dict.fromkeys(map(tuple, df[index].to_numpy().tolist())))  # rows in order of appearance
    wide = wide.reindex(pd.MultiIndex.from_tuples(rows, names=index) if len(index) > 1 else [r[0] for r in rows])
    wide = wide.reindex(columns=[o for o in order if o in wide.columns]).fillna("").reset_index()
    wide.columns.name = None
    return wide, list(wide.columns)


FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)


def render(text: str, root: Path) -> tuple[str, list[str]]:
    """(the README with every table regenerated, the markers' CSV paths whose table changed). Markers inside
    fenced code blocks are examples (docs/extending.md shows how to write one) and are left as they are."""
    blocks = []

    def mask(match):
        placeholder = f"\0FENCE{len(blocks)}\0" + "\n" * match.group(0).count("\n")  # same line numbers
        blocks.append((placeholder, match.group(0)))
        return placeholder

    out, changed = _render_tables(FENCE.sub(mask, text), root)
    for placeholder, block in blocks:
        out = out.replace(placeholder, block, 1)
    return out, changed


def _render_tables(text: str, root: Path) -> tuple[str, list[str]]:
    """:func:`render` of a text without fenced code blocks."""
    out, changed, pos = [], [], 0
    for match in START.finditer(text):
        if match.start() < pos:
            continue
        line = text.count("\n", 0, match.start()) + 1
        end = text.find(END, match.end())
        if end < 0:
            raise ReadmeError(f"line {line}: table marker without {END}")
        path, options = parse_spec(match.group("spec"))
        csv = root / path
        if not csv.is_file():
            raise ReadmeError(f"line {line}: {csv} does not exist (run the notebook that writes it)")
        try:
            table = render_table(pd.read_csv(csv), options)
        except ReadmeError as err:
            raise ReadmeError(f"line {line} ({path}): {err}") from None
        new = f"\n{table}\n"
        if text[match.end():end] != new:
            changed.append(f"line {line}: {path}")
        out += [text[pos:match.end()], new]
        pos = end
    out.append(text[pos:])
    return _render_values("".join(out), root, changed)


def _render_values(text: str, root: Path, changed: list) -> tuple[str, list[str]]:
    """Every inline value marker of ``text`` regenerated (module docstring); appends to ``changed``."""
    frames = {}

    def one(match):
        line = text.count("\n", 0, match.start()) + 1
        path, options = parse_spec(match.group("spec"), VALUE_KEYS)
        csv = root / path
        if not csv.is_file():
            raise ReadmeError(f"line {line}: {csv} does not exist (run the notebook that writes it)")
        if path not in frames:
            frames[path] = pd.read_csv(csv)
        try:
            value = render_value(frames[path], options)
        except ReadmeError as err:
            raise ReadmeError(f"line {line} ({path}): {err}") from None
        if match.group("body") != value:
            changed.append(f"line {line}: value from {path}")
        return match.group(0)[: match.start("body") - match.start()] + value + "<!-- /value -->"

    return VALUE.sub(one, text), changed


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="Markdown files (default: README.md and docs/*.md of the repository)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a table is out of date")
    parser.add_argument("--root", default=None,
                        help="folder the CSV paths are relative to (default: the repository for the default files, "
                             "else each file's folder)")
    args = parser.parse_args(argv)
    if args.files:
        files, root = [Path(f) for f in args.files], args.root
    else:
        files, root = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))], args.root or REPO
    status = 0
    for path in files:
        status = max(status, _one(path, Path(root) if root else path.parent, args.check))
    return status


def _one(readme: Path, root: Path, check: bool) -> int:
    """Render (or with ``check`` compare) one Markdown file; the exit status of :func:`main` for it."""
    if not readme.is_file():
        print(f"error: {readme} does not exist", file=sys.stderr)
        return 2
    try:
        text, changed = render(readme.read_text(encoding="utf-8"), root)
    except ReadmeError as err:
        print(f"error: {readme}: {err}", file=sys.stderr)
        return 2
    if check:
        for item in changed:
            print(f"{readme}: out of date, {item}", file=sys.stderr)
        if changed:
            print("run: python scripts/render_readme.py", file=sys.stderr)
        return 1 if changed else 0
    if changed:
        _write_atomic(readme, text)
    print(f"{readme}: {len(changed)} table(s) or value(s) regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
