"""scripts/run_roda_grid.py --merge and scripts/run_dpdl.py --tables: parallel jobs' files folded into one table,
a later row replacing an earlier one of the same cell, timings beside, histories replaced cell by cell."""

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


def test_a_missing_history_file_folds_nothing_and_says_why(tmp_path):
    out, job = tmp_path / "grid.csv", tmp_path / "patchcore_only.csv"
    _rows("roda", [0], 0.5).to_csv(out, index=False)
    _rows("patchcore", [0], 0.6).to_csv(job, index=False)
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="nothing folded: --merge-history .*writes no histories"):
        run_roda_grid.main(["--out", str(out), "--merge", str(job), "--history", str(tmp_path / "h.csv"),
                            "--merge-history", str(tmp_path / "patchcore_only_histories.csv")])
    assert out.read_bytes() == before  # the table and its histories change together or not at all


def test_merge_history_needs_its_target(tmp_path):
    with pytest.raises(SystemExit, match="--history"):
        run_roda_grid.main(["--out", str(tmp_path / "g.csv"), "--merge-history", str(tmp_path / "h.csv")])


def test_dpdl_tables_fold_jobs_into_the_notebook_tables(tmp_path, monkeypatch):
    """scripts/run_dpdl.py --tables: jobs folded into notebook 05's own names, a later job's row replacing an
    earlier one's, the wall-clock times kept beside their rows, a job with DPDL variants giving the ablation
    tables (its dpdl rows the full model, DPDL), and no other file."""
    import run_dpdl

    from lib.common.utils import read_csv, write_csv

    def job(name, rows):
        split = dict(setting="general", seen_class="all", n_anomalies=10, train_normal=20, train_anomaly=10,
                     seen_classes="x", test_normal=5, test_anomaly=5, test_classes="x", base_method="dpdl")
        return write_csv(pd.DataFrame([{**split, **r} for r in rows]), tmp_path / "jobs" / f"{name}.csv")

    first = job("a", [dict(task="a", seed=s, method=m, auroc=0.5, seconds=1.0 + s) for s in (0, 1)
                      for m in ("dpdl", "dra")])
    again = job("a_again", [dict(task="a", seed=1, method="dpdl", auroc=0.9, seconds=9.0)])
    hard = job("a_hard", [dict(task="a", seed=0, method=m, auroc=0.7, seconds=2.0, setting="hard", seen_class="x")
                          for m in ("dpdl", "dra")])
    ablation = job("a_ablation", [dict(task="a", seed=s, method=m, auroc=a, seconds=3.0) for s in (0, 1)
                                  for m, a in (("dpdl", 0.8), ("M_r", 0.6))])
    monkeypatch.setenv("OUT_DIR", str(tmp_path))
    run_dpdl.write_tables("smoke", first, again, hard, ablation)
    out = tmp_path / "results" / "smoke"
    written = {p.name for p in out.iterdir()}
    assert written == {"config.json", "05_protocol.csv", "05_general_runs.csv", "05_general_runs_timings.csv",
                       "05_general.csv", "05_hard_runs.csv", "05_hard_runs_timings.csv", "05_hard.csv",
                       "05_where_dpdl_wins.csv", "05_ablation_runs.csv", "05_ablation_runs_timings.csv",
                       "05_ablation.csv", "05_ablation_delta.csv"}
    general = read_csv(out / "05_general_runs.csv")
    assert len(general) == 4 and set(general.setting) == {"general"}
    replaced = general[(general.seed == 1) & (general.method == "dpdl")].iloc[0]
    assert replaced.auroc == 0.9 and replaced.seconds == 9.0
    assert general[general.method == "dra"].seconds.tolist() == [1.0, 2.0]
    assert set(read_csv(out / "05_hard_runs.csv").seen_class) == {"x"}
    delta = pd.read_csv(out / "05_ablation_delta.csv")
    assert delta.method.tolist() == ["M_r"] and delta["mean"].iloc[0] == pytest.approx(-0.2)
    assert set(pd.read_csv(out / "05_ablation_runs.csv").method) == {"DPDL", "M_r"}
    assert len(pd.read_csv(out / "05_protocol.csv")) == 3  # two general splits, one hard
    assert {p.name for p in (tmp_path / "figures" / "smoke").iterdir()} == {"05_general_M10.png", "05_ablation.png"}
    before = (out / "05_general_runs.csv").read_bytes()
    with pytest.raises(SystemExit, match="05_general_runs.csv holds 3 runs"):  # a new job would drop the others
        run_dpdl.write_tables("smoke", hard, again)
    with pytest.raises(SystemExit, match="05_hard_runs.csv holds 2 runs"):
        run_dpdl.write_tables("smoke", out / "05_general_runs.csv", again)
    assert (out / "05_general_runs.csv").read_bytes() == before
    run_dpdl.write_tables("smoke", out / "05_general_runs.csv", out / "05_hard_runs.csv", again)  # adding a job
    assert (out / "05_general_runs.csv").read_bytes() == before
    # an ablation job folded onto the ablation table: its dpdl rows replace the table's DPDL rows of the same
    # schedule (renamed before the replacement), another schedule's runs stay beside them
    rerun = job("a_ablation_rerun", [dict(task="a", seed=s, method=m, auroc=a, seconds=3.0) for s in (0, 1)
                                     for m, a in (("dpdl", 0.7), ("M_r", 0.6))])
    longer = job("a_ablation_50", [dict(task="a", seed=s, method=m, auroc=a, seconds=3.0, schedule="50x20x16")
                                   for s in (0, 1) for m, a in (("dpdl", 0.9), ("M_r", 0.85))])
    run_dpdl.write_tables("smoke", out / "05_ablation_runs.csv", rerun, longer)
    runs = pd.read_csv(out / "05_ablation_runs.csv")
    assert len(runs) == 8 and (runs.method == "DPDL").sum() == 4 and runs.auroc.max() == 0.9
    delta = pd.read_csv(out / "05_ablation_delta.csv").fillna({"schedule": "none"}).set_index("schedule")
    assert delta.loc["none", "mean"] == pytest.approx(-0.1) and delta.loc["50x20x16", "mean"] == pytest.approx(-0.05)
