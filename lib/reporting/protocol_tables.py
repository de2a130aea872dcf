"""RoDA's result tables in the paper's layout, from a grid table of our runs, one corruption stage at a time.

Both functions read ``results/real_full/08_roda_grid.csv`` (one row per task, method, corruption, seed, severity
and corruption ``stage``) and never average the two stages together: every output row names its stage.

:func:`paper_layout` is RoDA Table 1 (image AUROC) or Table 3 (pixel AUROC): per method and corruption, the mean
over categories of each category's mean over seeds, in percent, with two spreads::

    ours(m, c)        = mean_t  mean_s AUROC(m, t, c, s)
    std_categories    = std_t   mean_s AUROC(m, t, c, s)      (how much the categories differ)
    std_seeds         = mean_t  std_s  AUROC(m, t, c, s)      (how much a category moves with the seed)

and a ``mean`` row over the four corruptions (per category and seed first, as the paper's mean column). The
paper's number for the same method and corruption (``references/paper_numbers.csv``: MVTec, 15 categories,
WRN-50) stands beside ours in ``paper``, marked by ``paper_source``; it is never one of ours.

:func:`decomposition` is what each part of RoDA buys: a chain of configurations, each one controlled change away
from the one before (:data:`DECOMPOSITION`), and per step the effect paired over categories x seeds::

    effect(step) = mean_{t,s} [ AUROC(step, t, s) - AUROC(previous, t, s) ]

(AUROC averaged over the corruptions first; per corruption in the rows of that corruption), with the two-stage
bootstrap interval of the verdicts (:mod:`lib.reporting.effects`: categories, then seeds within them, t quantile).

:func:`table4_layout` is Table 4 (the rows of ``registry.TABLE4_ROWS``) in the same layout, on the (category,
seed)s every row ran. :func:`severity_curve` is Fig. 5b: AUROC under one corruption (the paper: Gaussian noise) at
severities 1-5, per method, on the (category, seed)s that ran every point of every curve.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lib.common.corruptions import stage_of
from lib.common.registry import PAPER_CORRUPTIONS, TABLE4_ABLATION, TABLE4_ROWS
from lib.reporting.effects import effect_interval

#: our method name -> the paper's row (RoDA Tables 1 and 3)
PAPER_METHODS = {"patchcore": "PatchCore", "ttt++": "TTT++", "ttac": "TTAC", "roda": "RoDA"}
#: the paper's table of each metric
PAPER_TABLES = {"image_auroc": "Table 1", "pixel_auroc": "Table 3"}
#: RoDA Table 4 (the ablation; both metrics in one table): our grid's method -> the paper's row, in the paper's
#: order (``registry.TABLE4_ROWS``)
TABLE4_METHODS = {grid: label for label, grid in TABLE4_ROWS.values()}

#: RoDA's parts, one controlled change each (``adabn_matched`` of ``roda.variants`` and the
#: ``DECOMPOSITION_VARIANTS`` of lib/experiments/profiles.py):
#: PatchCore; BatchNorm statistics alone (referenced to the training images); + transport (continuous entropic OT,
#: no augmentation); + the Eq. 6 discretisation; + the target augmentation (the paper's flips and rotations)
DECOMPOSITION = (("PatchCore", "patchcore"), ("BatchNorm statistics", "adabn_matched"),
                 ("+ transport", "matched_ot_noaug"), ("+ Eq. 6 discretisation", "matched_roda_noaug"),
                 ("+ augmentation", "matched_roda"))


#: RoDA Fig. 5b's curves: PatchCore and the paper-literal RoDA
FIG5B_METHODS = ("patchcore", "roda")


def _select(table: pd.DataFrame, stage: str, severity: int, tasks=None) -> pd.DataFrame:
    t = table.assign(stage=stage_of(table))
    t = t[(t.stage == stage) & (t.severity == severity)]
    return t[t.task.isin(tasks)] if tasks is not None else t


def paper_layout(table: pd.DataFrame, paper_numbers: pd.DataFrame | None = None, metric: str = "image_auroc",
                 stage: str = "native", severity: int = 5, tasks=None, methods=None,
                 corruptions=PAPER_CORRUPTIONS, paper_table: str | None = None,
                 paper_methods: dict | None = None) -> pd.DataFrame:
    """Table 1 (``metric="image_auroc"``) or Table 3 (``"pixel_auroc"``) in the paper's layout, in percent: one row
    per method and corruption (then ``mean``), ours with its spreads and counts, the paper's beside it.
    ``paper_table`` / ``paper_methods`` (our method -> the paper's row) read another of its tables: Table 4 with
    :data:`TABLE4_METHODS` (``methods`` = its keys, in its order)."""
    paper_table = paper_table or PAPER_TABLES[metric]
    paper_methods = PAPER_METHODS if paper_methods is None else paper_methods
    t = _select(table, stage, severity, tasks)
    t = t[t.condition.isin(corruptions) & t[metric].notna()]
    if methods is not None:
        t = t[t.method.isin(methods)]
    per_seed = t.groupby(["method", "condition", "task", "seed"])[metric].mean().reset_index()
    mean = per_seed.groupby(["method", "task", "seed"])[metric].agg(["mean", "size"]).reset_index()
    mean = mean[mean["size"] == len(corruptions)].drop(columns="size").rename(columns={"mean": metric})
    per_seed = pd.concat([per_seed, mean.assign(condition="mean")], ignore_index=True)
    rows = []
    for (method, condition), g in per_seed.groupby(["method", "condition"], sort=False):
        by_task = g.groupby("task")[metric]
        rows.append(dict(stage=stage, severity=severity, metric=metric, method=method, condition=condition,
                         ours=100 * by_task.mean().mean(), std_categories=100 * by_task.mean().std(ddof=1),
                         std_seeds=100 * by_task.std(ddof=1).mean(), n_categories=by_task.ngroups,
                         n_seeds=int(g.seed.nunique())))
    out = pd.DataFrame(rows, columns=["stage", "severity", "metric", "method", "condition", "ours", "std_categories",
                                      "std_seeds", "n_categories", "n_seeds"])
    out["paper"], out["paper_source"] = np.nan, ""
    if paper_numbers is not None and len(out):
        p = paper_numbers[(paper_numbers.paper == "roda") & (paper_numbers.table == paper_table)
                          & (paper_numbers.dataset == "MVTec") & (paper_numbers.metric == metric)]
        p = p.set_index(["method", "setting"])["value"]
        for i, row in out.iterrows():
            key = (paper_methods.get(row.method), row.condition)
            if key in p.index:
                out.loc[i, "paper"] = float(p.loc[key])
                out.loc[i, "paper_source"] = f"the paper's, RoDA {paper_table} (MVTec, 15 categories, WRN-50)"
    order = {"condition": {c: i for i, c in enumerate((*corruptions, "mean"))}}
    if methods is not None:  # in the caller's order (Table 4's rows), else alphabetical
        order["method"] = {m: i for i, m in enumerate(methods)}
    return out.sort_values(["method", "condition"], ignore_index=True,
                           key=lambda s: s.map(order[s.name]) if s.name in order else s)



def _complete(runs: pd.DataFrame, points) -> pd.DataFrame:
    """The rows of the (task, seed)s that ran every point (a distinct value of the columns ``points``) that any
    (task, seed) of ``runs`` ran: the units a table or curve compares on the same images."""
    if runs.empty:
        return runs
    key = runs[list(points)].apply(tuple, axis=1)
    ran = key.groupby([runs.task, runs.seed]).nunique()
    units = ran.index[ran == key.nunique()]
    return runs[pd.MultiIndex.from_frame(runs[["task", "seed"]]).isin(units)]


def _table4_runs(t: pd.DataFrame, corruptions=PAPER_CORRUPTIONS) -> pd.DataFrame:
    """The runs of :data:`TABLE4_METHODS` on the (task, seed)s where every row ran every corruption (one stage and
    severity); empty where no ablation-only row ran."""
    t = t[t.method.isin(TABLE4_METHODS) & t.condition.isin(corruptions)]
    return _complete(t, ["method", "condition"]) if t.method.isin(TABLE4_ABLATION).any() else t.iloc[:0]


def table4_layout(table: pd.DataFrame, paper_numbers: pd.DataFrame | None = None, metric: str = "image_auroc",
                  stage: str = "native", severity: int = 5, tasks=None,
                  corruptions=PAPER_CORRUPTIONS) -> pd.DataFrame:
    """RoDA Table 4 (the alignment-loss ablation) in the layout of :func:`paper_layout`, one row per
    :data:`TABLE4_METHODS` row that ran, on the (category, seed)s where every one of them ran, so the rows compare
    the same images (the grid's PatchCore and RoDA ran more seeds than the ablation rows). Empty without
    ablation rows (``registry.TABLE4_ABLATION``)."""
    t = _table4_runs(_select(table, stage, severity, tasks), corruptions)
    if t.empty:
        return paper_layout(t, None, metric, stage, severity)
    return paper_layout(t, paper_numbers, metric, stage, severity, methods=list(TABLE4_METHODS),
                        corruptions=corruptions, paper_table="Table 4", paper_methods=TABLE4_METHODS)

def decomposition(table: pd.DataFrame, stage: str = "native", severity: int = 5, chain=DECOMPOSITION, tasks=None,
                  corruptions=PAPER_CORRUPTIONS, n_boot: int = 2000, level: float = 0.95,
                  seed: int = 0) -> pd.DataFrame:
    """Per step of ``chain`` (label, method), metric and corruption (``mean``: over the corruptions), the effect of
    the step over the previous configuration, paired by (category, seed): the mean over categories of the mean over
    their seeds, with the two-stage bootstrap interval and p of :func:`lib.reporting.effects.effect_interval`
    (categories, then seeds within them; the unit of the verdicts). Steps whose runs are missing are left out of the
    pairing (``n_pairs`` counts what was paired)."""
    t = _select(table, stage, severity, tasks)
    t = t[t.condition.isin(corruptions)]
    rows = []
    for (_, a), (label_b, b) in zip(chain[:-1], chain[1:]):
        for metric in ("image_auroc", "pixel_auroc"):
            runs = {m: t[t.method == m].groupby(["task", "seed", "condition"])[metric].mean() for m in (a, b)}
            diff = (runs[b] - runs[a]).dropna()
            whole = diff.groupby(["task", "seed"]).agg(["mean", "size"])
            parts = [("mean", whole.loc[whole["size"] == len(corruptions), "mean"])]
            parts += [(c, diff.xs(c, level="condition")) for c in corruptions if c in diff.index.get_level_values(2)]
            for condition, d in parts:
                iv = effect_interval(100 * d, alpha=1 - level, n_boot=n_boot, seed=seed)
                rows.append(dict(stage=stage, severity=severity, step=label_b, from_method=a, to_method=b,
                                 metric=metric, condition=condition, n_pairs=len(d), n_categories=iv["n_categories"],
                                 effect=iv["estimate"], ci_low=iv["low"], ci_high=iv["high"], p=iv["p"],
                                 level=level))
    return pd.DataFrame(rows)


def backbone_effects(table: pd.DataFrame, stage: str = "native", severity: int = 5, reference: str = "patchcore",
                     base: str | None = None, corruptions=PAPER_CORRUPTIONS, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> pd.DataFrame:
    """Each method's effect over ``reference`` per backbone, on the (category, seed, corruption) cells that every
    backbone of ``table`` ran with both the method and the reference, so the backbones are compared on the same
    images; and, per pair of backbones, the difference of the two effects (``backbone="B - A"``, paired by cell):
    does the method's gain or deficit change with the encoder?

    For method m, backbone b and cell (category c, seed s, corruption k):
    ``d_b = AUROC(m, b) - AUROC(reference, b)``; a row's ``effect`` is the mean over categories of the mean over
    seeds (``condition="mean"``: of each (c, s)'s mean over the corruptions, complete ones only), with the two-stage
    bootstrap interval and p of :func:`lib.reporting.effects.effect_interval`; the ``B - A`` rows do the same with
    ``d_B - d_A``, where A comes first: ``base`` (the encoder the others are read against), then the rest in
    alphabetical order. ``method_mean`` / ``reference_mean``: the two AUROCs (percent) over those cells."""
    t = _select(table, stage, severity)
    t = t[t.condition.isin(corruptions)]
    backbones = sorted(t.backbone.dropna().unique(), key=lambda b: (b != base, b))
    keys = ["task", "seed", "condition"]
    rows = []
    for method in sorted(set(t.method) - {reference}):
        for metric in ("image_auroc", "pixel_auroc"):
            runs = {(b, m): t[(t.backbone == b) & (t.method == m)].groupby(keys)[metric].mean()
                    for b in backbones for m in (method, reference)}
            cells = None
            for r in runs.values():
                idx = r.dropna().index
                cells = idx if cells is None else cells.intersection(idx)
            if cells is None or not len(cells):
                continue
            diff = {b: 100 * (runs[(b, method)] - runs[(b, reference)]).loc[cells] for b in backbones}
            series = [(b, d, runs[(b, method)].loc[cells], runs[(b, reference)].loc[cells]) for b, d in diff.items()]
            series += [(f"{b2} - {b1}", diff[b2] - diff[b1], None, None)
                       for i, b1 in enumerate(backbones) for b2 in backbones[i + 1:]]
            for name, d, ours, ref in series:
                whole = d.groupby(["task", "seed"]).agg(["mean", "size"])
                parts = [("mean", whole.loc[whole["size"] == len(corruptions), "mean"])]
                parts += [(c, d.xs(c, level="condition")) for c in corruptions
                          if c in d.index.get_level_values("condition")]
                for condition, x in parts:
                    if not len(x):
                        continue
                    if condition == "mean":  # the cells of the (category, seed)s with every corruption
                        unit = cells.droplevel("condition")
                        sel = cells[unit.isin(x.index)]
                    else:
                        sel = cells[cells.get_level_values("condition") == condition]
                    iv = effect_interval(x, alpha=1 - level, n_boot=n_boot, seed=seed)
                    rows.append(dict(stage=stage, severity=severity, method=method, reference=reference,
                                     backbone=name, metric=metric, condition=condition, n_pairs=len(x),
                                     n_categories=iv["n_categories"], n_seeds=int(x.index.get_level_values("seed")
                                                                                  .nunique()),
                                     method_mean=np.nan if ours is None else 100 * ours.loc[sel].mean(),
                                     reference_mean=np.nan if ref is None else 100 * ref.loc[sel].mean(),
                                     effect=iv["estimate"], ci_low=iv["low"], ci_high=iv["high"], p=iv["p"],
                                     level=level))
    return pd.DataFrame(rows)


def severity_curve(table: pd.DataFrame, stage: str = "native", condition: str = "gaussian_noise",
                   methods=FIG5B_METHODS, tasks=None) -> pd.DataFrame:
    """RoDA Fig. 5b: per method, severity and metric, the AUROC (percent) under ``condition``: the mean over
    categories of each category's mean over seeds, with ``std_categories`` as in :func:`paper_layout`::

        ours(m, k) = mean_t  mean_s AUROC(m, t, condition, s, severity k)

    Every point of every curve reads the same (category, seed)s: those that ran every (method, severity) point
    that any of them ran (``n_pairs`` counts them), so a curve's slope is the severity's, not a change of
    categories. Empty when no (category, seed) ran every point."""
    t = table.assign(stage=stage_of(table))
    t = t[(t.stage == stage) & (t.condition == condition) & t.method.isin(methods)]
    if tasks is not None:
        t = t[t.task.isin(tasks)]
    columns = ["stage", "condition", "metric", "method", "severity", "ours", "std_categories", "n_categories",
               "n_seeds", "n_pairs"]
    rows = []
    for metric in ("image_auroc", "pixel_auroc"):
        keep = _complete(t[t[metric].notna()], ["method", "severity"])  # every (method, severity) point
        keep = keep.groupby(["method", "severity", "task", "seed"])[metric].mean()
        for (method, severity), g in keep.groupby(["method", "severity"]):
            by_task = g.groupby("task").mean()
            rows.append(dict(stage=stage, condition=condition, metric=metric, method=method, severity=int(severity),
                             ours=100 * by_task.mean(), std_categories=100 * by_task.std(ddof=1),
                             n_categories=len(by_task), n_seeds=int(g.index.get_level_values("seed").nunique()),
                             n_pairs=len(g)))
    return pd.DataFrame(rows, columns=columns)


#: the stems of :func:`grid_views` (read by lib.reporting.fidelity beside the files of notebook 04)
GRID_TABLE4, GRID_FIG5B = "08_roda_grid_table4", "08_roda_grid_fig5b"


def grid_views(table: pd.DataFrame, severity: int = 5, condition: str = "gaussian_noise",
               corruptions=PAPER_CORRUPTIONS) -> dict:
    """The RoDA grid's runs in the layouts of notebook 04's tables, for the verdicts of
    :mod:`lib.reporting.fidelity` (each stage on its own, the cells of :func:`table4_layout` and
    :func:`severity_curve`):

    - :data:`GRID_TABLE4`, as ``04_table4.csv``: ``task, row, condition, seed, stage, image_auroc, pixel_auroc``,
      one row per Table 4 run at ``severity``, the grid's method named by its row of ``registry.TABLE4_ROWS``,
      on the (category, seed)s where every row ran;
    - :data:`GRID_FIG5B`, as ``04_fig5b.csv``: ``task, method, severity, seed, stage, ...``, PatchCore and the
      literal RoDA under ``condition`` on the (category, seed)s that ran every (method, severity) point, where a
      stage ran more than one severity."""
    t = table.assign(stage=stage_of(table))
    row_of = {grid: row for row, (_, grid) in TABLE4_ROWS.items()}
    metrics = ["image_auroc", "pixel_auroc"]
    columns = {GRID_TABLE4: ["task", "row", "condition", "seed", "stage", *metrics],
               GRID_FIG5B: ["task", "method", "severity", "seed", "stage", *metrics]}
    table4, fig5b = [], []
    for _, g in t.groupby("stage"):
        runs = _table4_runs(g[g.severity == severity], corruptions)
        table4.append(runs.assign(row=runs.method.map(row_of))[columns[GRID_TABLE4]])
        noise = g[(g.condition == condition) & g.method.isin(FIG5B_METHODS)]
        if noise.severity.nunique() > 1:
            fig5b.append(_complete(noise, ["method", "severity"])[columns[GRID_FIG5B]])
    return {stem: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns[stem])
            for stem, parts in ((GRID_TABLE4, table4), (GRID_FIG5B, fig5b))}
