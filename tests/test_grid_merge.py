"""scripts/run_roda_grid.py --merge: parallel jobs' grid files folded into one table, a later row replacing an
earlier one of the same cell, timings beside, histories replaced cell by cell."""

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import run_roda_grid  # noqa: E402


def _rows(method, seeds, value, **extra):
    return pd.DataFrame([dict(task="t", method=method, condition="blur", seed=s, pixel_auroc=value,
                              image_auroc=value, **extra) for s in seeds])


def test_merge_folds_parallel_grid_files(tmp_path):
    out = tmp_path / "grid.csv"
    _rows("roda", [0, 1], 0.5).to_csv(out, index=False)
    _rows("roda", [0], 0.5, adapt_seconds=9.0).to_csv(tmp_path / "grid_timings.csv", index=False)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _rows("roda", [1], 0.7).to_csv(a, index=False)  # a rerun of a finished cell replaces it
    _rows("roda", [1], 1.0, adapt_seconds=3.0).to_csv(tmp_path / "a_timings.csv", index=False)
    _rows("ttac", [0, 1], 0.6).to_csv(b, index=False)
    hist, ha = tmp_path / "hist.csv", tmp_path / "ha.csv"
    pd.concat([_rows("roda", [1, 1, 1], 0.1), _rows("roda", [0], 0.1)]).to_csv(hist, index=False)
    _rows("roda", [1, 1], 0.2).to_csv(ha, index=False)

    run_roda_grid.main(["--out", str(out), "--merge", str(a), str(b), "--history", str(hist),
                        "--merge-history", str(ha)])

    merged = pd.read_csv(out)
    assert len(merged) == 4
    got = merged.set_index(["method", "seed"])["pixel_auroc"].to_dict()
    assert got == {("roda", 0): 0.5, ("roda", 1): 0.7, ("ttac", 0): 0.6, ("ttac", 1): 0.6}
    timings = pd.read_csv(tmp_path / "grid_timings.csv")
    assert sorted(timings["seed"]) == [0, 1] and timings["adapt_seconds"].tolist() == [9.0, 3.0]
    h = pd.read_csv(hist)
    assert (h["seed"] == 1).sum() == 2 and set(h.loc[h["seed"] == 1, "pixel_auroc"]) == {0.2}  # replaced whole
    assert (h["seed"] == 0).sum() == 1
    assert not list(tmp_path.glob(".*"))  # nothing half-written left behind
    run_roda_grid.main(["--out", str(out), "--summary-only", "--reference", "ttac"])  # needs no --tasks
    assert pd.read_csv(tmp_path / "grid_vs_ttac.csv").set_index("method").loc["roda", "cells"] == 1


def test_merge_history_needs_its_target(tmp_path):
    with pytest.raises(SystemExit, match="--history"):
        run_roda_grid.main(["--out", str(tmp_path / "g.csv"), "--merge-history", str(tmp_path / "h.csv")])


def test_dpdl_merge_keeps_the_runs_timings(tmp_path):
    """scripts/run_dpdl.py --merge reads per-dataset runs tables and writes one: the wall-clock times kept
    beside each (``*_timings.csv``) go with their rows into the merged table's timings."""
    import run_dpdl

    from lib.common.utils import write_csv

    files = []
    for task, seconds in (("a", [1.5, 2.5]), ("b", [3.5, 4.5])):
        runs = pd.DataFrame([dict(task=task, setting="general", seen_class="x", n_anomalies=10, method=m, seed=0,
                                  auroc=0.5 + i / 10, seconds=s)
                             for i, (m, s) in enumerate(zip(("dpdl", "dra"), seconds))])
        files.append(write_csv(runs, tmp_path / f"{task}_runs.csv"))
    run_dpdl.merge(tmp_path / "all_runs.csv", *files)
    times = pd.read_csv(tmp_path / "all_runs_timings.csv")
    assert times.seconds.tolist() == [1.5, 2.5, 3.5, 4.5]
