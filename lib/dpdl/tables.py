"""The tables of notebook 05 from its per-run rows, so that the notebook and ``scripts/run_dpdl.py`` write the
same files from the same runs.

A *runs* table has one row per split and method (:func:`lib.dpdl.baselines.run_openset`): the split's summary
(``task``, ``setting``, ``seen_class``, ``n_anomalies``, ``seed``, the train and test counts), ``method`` and
``auroc``. From it:

- ``05_general.csv``: mean ± std of the AUROC over seeds per task, M and method (:func:`general_table`);
- ``05_hard.csv``: the same per seen class, and per dataset the mean over classes taken per seed first, then
  mean ± std over seeds (``seen_class = "mean"``; :func:`hard_table`);
- ``05_where_dpdl_wins.csv``: DPDL's rank among the methods per task, setting and M, and its margin over the
  best other method (:func:`where_dpdl_wins`);
- ``05_ablation.csv`` and ``05_ablation_delta.csv``: each DPDL variant's AUROC, and the variant minus full DPDL
  paired by seed (:func:`ablation_tables`);
- ``05_protocol.csv``: one row per split, its counts (:func:`protocol_table`).
"""

from __future__ import annotations

import pandas as pd

from lib.dpdl.protocol import aggregate_runs

__all__ = ["ABLATION_BASE", "PROTOCOL_COLUMNS", "ablation_tables", "general_table", "hard_table", "protocol_table",
           "where_dpdl_wins"]

#: the full model's label in the ablation tables (the variants are named after what they change)
ABLATION_BASE = "DPDL"
#: the split summary (:meth:`lib.dpdl.protocol.OpenSetSplit.summary`) that every runs row starts with
PROTOCOL_COLUMNS = ("task", "setting", "seen_class", "n_anomalies", "seed", "train_normal", "train_anomaly",
                    "seen_classes", "test_normal", "test_anomaly", "test_classes")


def general_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std of the AUROC over seeds per task, M and method (``05_general.csv``)."""
    return aggregate_runs(runs, ["task", "n_anomalies", "method"])


def hard_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per seen class, mean ± std over seeds; then per dataset (``seen_class = "mean"``) the mean over the seen
    classes of each seed, and mean ± std of those over seeds (``05_hard.csv``)."""
    per_class = aggregate_runs(runs, ["task", "n_anomalies", "seen_class", "method"])
    per_seed = runs.groupby(["task", "n_anomalies", "method", "seed"], as_index=False)["auroc"].mean()
    mean = aggregate_runs(per_seed, ["task", "n_anomalies", "method"]).assign(seen_class="mean")
    return pd.concat([per_class, mean], ignore_index=True)


def where_dpdl_wins(general: pd.DataFrame, hard: pd.DataFrame | None = None) -> pd.DataFrame:
    """DPDL's mean AUROC, the best other method and its mean, DPDL's margin over it and DPDL's rank (1: first)
    per task, setting and M, from :func:`general_table` and (its dataset means) :func:`hard_table`."""
    tables = [general.assign(setting="general")]
    if hard is not None and len(hard):
        tables.append(hard[hard.seen_class == "mean"].assign(setting="hard"))
    summary = pd.concat(tables, ignore_index=True)
    if "dpdl" not in set(summary["method"]):
        raise ValueError(f"no 'dpdl' rows among the methods {sorted(set(summary['method']))}: the table ranks DPDL")
    rows = []
    for key, g in summary.groupby(["task", "setting", "n_anomalies"], sort=False):
        g = g.set_index("method")["mean"]
        others = g.drop("dpdl")
        rows.append(dict(zip(["task", "setting", "n_anomalies"], key), dpdl=round(g["dpdl"], 3),
                         best_other=others.idxmax(), best_other_auroc=round(others.max(), 3),
                         margin=round(g["dpdl"] - others.max(), 3), dpdl_rank=int((g > g["dpdl"]).sum() + 1)))
    return pd.DataFrame(rows)


def ablation_tables(runs: pd.DataFrame, base: str = ABLATION_BASE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(``05_ablation.csv``, ``05_ablation_delta.csv``): mean ± std of each variant's AUROC over seeds per task,
    and each variant minus the full model ``base`` on the same task and seed, mean ± std over seeds. Runs that
    name their ``schedule`` (epochs x iterations x batch) are grouped and paired within it: a variant is never
    compared with a full model trained for another number of steps (it has no delta without one)."""
    if base not in set(runs["method"]):
        raise ValueError(f"the ablation runs hold no {base!r} rows (the full model every variant is paired with); "
                         f"methods: {sorted(set(runs['method']))}")
    by = ["schedule"] if "schedule" in runs.columns else []
    ablation = aggregate_runs(runs, ["task", *by, "method"])
    pair = ["task", *by, "seed"]
    full = runs[runs.method == base].set_index(pair)["auroc"]
    if full.index.duplicated().any():
        raise ValueError(f"two {base!r} runs for one {', '.join(pair)}: fold the jobs first")
    others = runs[runs.method != base]
    match = full.reindex(pd.MultiIndex.from_frame(others[pair])).to_numpy()
    paired = others.assign(delta=others.auroc.to_numpy() - match).dropna(subset=["delta"])
    return ablation, aggregate_runs(paired, ["task", *by, "method"], value="delta")


def protocol_table(*runs: pd.DataFrame) -> pd.DataFrame:
    """One row per split (its counts, :data:`PROTOCOL_COLUMNS`) of the given runs tables, in their order."""
    rows = pd.concat([r[list(PROTOCOL_COLUMNS)] for r in runs if len(r)], ignore_index=True)
    return rows.drop_duplicates(ignore_index=True)
