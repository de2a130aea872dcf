#!/usr/bin/env python
"""The smoke profile's result tables as a golden record, to show that moving code does not change results.

    python scripts/smoke_golden.py --check     # run every notebook on the smoke profile, compare with the record
    python scripts/smoke_golden.py --update    # the same run, then replace the record (an intended change)

The run is the one the test suite makes (``tests/test_notebooks.py``: every notebook in order into one
folder, ``device="cpu"``, the profile's own seeds), here on one thread so that it is reproducible to the byte
on a given machine: ``--check`` lists every table as identical to the byte, equal within the test's tolerance
(another thread count or CPU reorders floating-point sums: relative differences up to ~3e-4 were measured
between 1 and 2 threads), or different, and exits 1 on a difference. Timing tables and columns are left out.
The record lives in ``tests/golden/smoke/``; the test suite compares its own smoke run with it (within
tolerance). Refresh it with ``--update`` in the same commit as a change that is meant to move results,
and say so in the commit message.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "smoke"
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

RTOL, ATOL = 1e-3, 1e-6


def tables(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.glob("*.csv")) if "_timings" not in p.name}


def compare(ours: Path, golden: Path) -> tuple[str, str]:
    """``("identical" | "within tolerance" | "different", detail)`` for two CSV files."""
    import numpy as np
    import pandas as pd

    from lib.common.utils import is_timing_column

    if ours.read_bytes() == golden.read_bytes():
        return "identical", ""
    a, b = pd.read_csv(ours), pd.read_csv(golden)
    a, b = (df.drop(columns=[c for c in df.columns if is_timing_column(c)]) for df in (a, b))
    if list(a.columns) != list(b.columns) or a.shape != b.shape:
        return "different", f"columns/shape {list(a.columns)} {a.shape} vs {list(b.columns)} {b.shape}"
    worst = 0.0
    for col in a.columns:
        x, y = a[col], b[col]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            x, y = x.to_numpy(float), y.to_numpy(float)
            if not np.allclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True):
                bad = ~np.isclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True)
                return "different", f"{col}: {int(bad.sum())} values, e.g. {x[bad][0]!r} vs {y[bad][0]!r}"
            both = ~(np.isnan(x) | np.isnan(y))
            if both.any():
                worst = max(worst, float(np.max(np.abs(x[both] - y[both]) / (np.abs(y[both]) + ATOL))))
        elif not x.astype(str).equals(y.astype(str)):
            return "different", f"{col}: {int((x.astype(str) != y.astype(str)).sum())} values differ"
    return "within tolerance", f"max relative difference {worst:.1e}"


def check(folder: Path, golden: Path = GOLDEN) -> list[tuple[str, str, str]]:
    """One ``(table, verdict, detail)`` per table of the record or of the run."""
    ours, gold = tables(folder), tables(golden)
    rows = [(name, "missing from the run", "") for name in gold if name not in ours]
    rows += [(name, "not in the record", "") for name in ours if name not in gold]
    rows += [(name, *compare(ours[name], gold[name])) for name in gold if name in ours]
    return sorted(rows)


def run(out_dir: Path) -> Path:
    import run_notebooks

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # the kernels inherit one thread
    for path in run_notebooks.notebooks():
        out = out_dir / "runs" / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        run_notebooks.run_one(path, out, dict(profile="smoke", out_dir=str(out_dir), device="cpu", seed=None,
                                              data_root=None, categories=None), timeout=900, progress=True)
    return out_dir / "results" / "smoke"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--update", action="store_true")
    ap.add_argument("--results", type=Path, default=None, help="compare this results folder instead of running")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = args.results or run(Path(tmp))
        if args.update:
            staging = GOLDEN.with_name(GOLDEN.name + ".new")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for name, path in tables(results).items():
                shutil.copyfile(path, staging / name)
            shutil.rmtree(GOLDEN, ignore_errors=True)
            staging.rename(GOLDEN)  # the record is replaced whole or not at all
            print(f"{GOLDEN}: {len(tables(GOLDEN))} tables recorded")
            return 0
        rows = check(results)
    width = max(len(r[0]) for r in rows)
    for name, verdict, detail in rows:
        print(f"{name:<{width}}  {verdict:<20}  {detail}")
    counts = {v: sum(r[1] == v for r in rows) for v in sorted({r[1] for r in rows})}
    print("; ".join(f"{n} {v}" for v, n in counts.items()))
    return 0 if set(counts) <= {"identical", "within tolerance"} else 1


if __name__ == "__main__":
    sys.exit(main())
