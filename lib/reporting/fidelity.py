"""Paper vs. ours: for each claim of RoDA and DPDL, our effect with a confidence interval beside the paper's, and a
verdict corrected for the number of claims.

The claims are data (:mod:`lib.reporting.claims`); :func:`fidelity_table` runs one loop over them. A claim names
the paper rows it rests on (keys of ``references/paper_numbers.csv``) and the table, filter and metric of ours
(columns ``file``, ``filter`` and ``metric`` of the fidelity table).

**The unit of replication is the category x seed cell.** Each cell (task c, seed s) that both sides of a pairwise
claim ran gives one paired difference d_cs = A_cs - scale * B_cs (the rows of a cell are averaged first: the
corruptions of a "mean over corruptions" claim, the seen classes of DPDL's hard setting). Images are not the unit:
every seed of a category is scored on the same test split, and a claim says that one method is better across
categories and runs. Our effect is the paper's class mean, in AUROC points (our AUROCs are fractions, the
paper's percents)::

    theta = 1/C sum_c dbar_c,    dbar_c = 1/n_c sum_s d_cs

**Interval: a two-stage bootstrap** (:mod:`lib.reporting.effects`). ``N_BOOTSTRAP`` resamples, seeded with
``BOOTSTRAP_SEED``: draw C categories with replacement, then within each drawn category its n_c cells with
replacement, and take theta of the resample; with one category only the seeds are resampled. The bootstrap's
standard deviation times sqrt(k / (k - 1)) (undoing the plug-in shrinkage) is the standard error ``se``, with k
the number of independent units at the top level: the categories where there are two or more, else the seeds.
The 1 - alpha interval is theta +- t_{k-1, 1-alpha/2} se and the p value of theta = 0 is two-sided from the same
t. Percentile intervals of a bootstrap over 2-5 units are far too narrow (over two units they span just the two
values); the t quantile on k - 1 degrees of freedom keeps a tiny sample from deciding anything. One cell (k < 2),
or no variation at all (both methods equal in every cell, e.g. both at 100): **not testable**.

**Holm correction**: the p values of all tested pairwise claims of one paper, counted or not, are adjusted
together by Holm's step-down; the verdicts use the adjusted p.

**Verdicts** (level ``alpha`` 0.05, interval at 1 - alpha), from :func:`lib.reporting.effects.verdict`:

- **reproduced in size**: significant after Holm in the paper's direction, and the paper's effect lies inside
  our interval;
- **reproduced**: significant after Holm in the paper's direction, the paper's effect outside our interval (or
  the paper gives a direction only, as for claims read off a figure);
- **contradicted**: significant after Holm in the other direction;
- **not reproduced**: not significant after Holm, and all of our interval falls short of the paper's effect: our
  data rule out an effect of the paper's size without ruling out zero (absolute numbers: the paper's value lies
  outside the interval of ours);
- **inconclusive**: not significant after Holm, and the interval covers the paper's effect or lies beyond it (or
  the paper gives no size);
- **not testable**: no replication (one cell) or no variation;
- **not comparable**: an absolute number measured with another backbone or on other data (the reason says
  which), or a metric our data cannot give (pixel AUROC without masks);
- **not run**: no table, or no rows of the stage, answers the claim; ``why`` names the command that produces it.

**What counts** (column ``counted``; ``caveat`` says why not): image-AUROC claims on a category whose grey-level
shortcut AUROC exceeds ``SHORTCUT_MAX`` (notebook 01's ``01_shortcut.csv``: an image's mean grey level, or its
contrast, alone as the anomaly score, in either direction) are split off into a second row holding only those
categories, reported but not counted (MVTec screw); DPDL claims measured at another schedule than the paper's
50 x 20 (column ``schedule`` of the runs, else ``context["dpdl_schedule"]``) are reported but not counted.
:func:`summary` counts the counted rows.

**Corruption stage.** RoDA's tables carry a ``stage`` column (``native``: corrupted at the image's native
resolution before the resize, the paper's protocol; ``working``: after it); a table without the column was
measured at the working stage. ``fidelity_table(stage=)`` reads only that stage's rows (clean rows serve every
stage); the paper's protocol is ``PAPER_STAGE``. The two stages are never pooled.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from lib.common.corruptions import stage_of
from lib.reporting.claims import ALL_CLAIMS, DPDL_CLAIMS, RODA_CLAIMS, Claim, reference_key, slug
from lib.reporting.effects import ALPHA, BOOTSTRAP_SEED, N_BOOTSTRAP, category_mean, effect_interval, holm, verdict
from lib.reporting.result_tables import (
    COMMANDS,
    GRID_VIEWS,
    NOTEBOOK_COMMAND,
    load_reference,
    load_results,
)

PERCENT_METRICS = {"image_auroc", "pixel_auroc", "auc_pr", "auroc", "share_assigned"}
IMAGE_METRICS = {"image_auroc", "auroc"}  # image-level AUROC: the grey-level shortcut applies
TASK_COLUMNS = ("task", "dataset")
COMPLETE_COLUMNS = ("condition",)  # a list of these in a filter is a mean over all of them, per cell
BACKBONE_IDS = {"WRN-50": "wide_resnet50_2", "ResNet-18": "resnet18"}
PAPER_STAGE = "native"  # the paper's protocol: corrupt at native resolution, then resize
SHORTCUT_COLUMNS = ("mean_grey_auroc", "contrast_auroc")  # 01_shortcut.csv
SHORTCUT_MAX = 0.9
PAPER_SCHEDULE = "50x20"  # DPDL: 50 epochs x 20 iterations
VERDICTS = ("reproduced in size", "reproduced", "contradicted", "not reproduced", "inconclusive", "not testable",
            "not comparable", "not run")
__all__ = ["ALL_CLAIMS", "DPDL_CLAIMS", "RODA_CLAIMS", "Claim", "reference_key", "slug", "fidelity_table",
           "load_reference", "load_results", "summary", "verdict", "effect_interval", "holm", "profile_context"]


# ----------------------------------------------------------------------------------------------------
# Reading the reference
# ----------------------------------------------------------------------------------------------------


def paper_value(reference: pd.DataFrame, keys) -> float | None:
    """Mean of the reference rows ``keys`` (None for no keys). Unknown keys raise KeyError."""
    if not keys:
        return None
    indexed = reference.set_index("key")["value"]
    missing = [k for k in keys if k not in indexed.index]
    if missing:
        raise KeyError(f"not in the reference file: {missing}")
    return float(indexed.loc[list(keys)].astype(float).mean())


def shortcut_aurocs(results: dict) -> dict:
    """task -> the strongest grey-level shortcut AUROC of ``01_shortcut.csv`` (either direction: max(a, 1 - a))."""
    df = results.get("01_shortcut")
    if df is None or "task" not in df.columns:
        return {}
    cols = [c for c in SHORTCUT_COLUMNS if c in df.columns]
    if not cols:
        return {}
    values = df[cols].astype(float)
    return dict(zip(df["task"].astype(str), np.fmax(values, 1.0 - values).max(axis=1)))


# ----------------------------------------------------------------------------------------------------
# Our side: one value per category x seed cell
# ----------------------------------------------------------------------------------------------------


def task_column(df: pd.DataFrame) -> str | None:
    return next((c for c in TASK_COLUMNS if c in df.columns), None)


def _select(df: pd.DataFrame, where: dict) -> tuple[pd.DataFrame, dict]:
    """Rows of ``df`` matching ``where``; also the values that "max"/"min" resolved to."""
    sub, resolved, special = df, {}, {}
    for col, want in where.items():
        if col not in sub.columns:
            return sub.iloc[0:0], resolved
        if isinstance(want, str) and want in ("max", "min"):
            special[col] = want
        elif callable(want):
            sub = sub[want(sub[col])]
        elif isinstance(want, (list, tuple, set, frozenset)):
            sub = sub[sub[col].isin(list(want))]
        else:
            sub = sub[sub[col] == want]
    for col, how in special.items():
        if sub.empty:
            break
        resolved[col] = sub[col].max() if how == "max" else sub[col].min()
        sub = sub[sub[col] == resolved[col]]
    return sub, resolved


def _to_percent(values: pd.Series, metric: str) -> pd.Series:
    values = values.astype(float)
    if metric in PERCENT_METRICS and values.abs().max() <= 1.0 + 1e-9:
        return values * 100.0
    return values


def _no_cells() -> pd.Series:
    """An empty side: no (task, seed) cell, with the index names every side carries (so it aligns with the other)."""
    return pd.Series(dtype=float, index=pd.MultiIndex.from_tuples([], names=["task", "seed"]))


def side_cells(df: pd.DataFrame, selector, metric: str) -> tuple[pd.Series, dict]:
    """One side of a claim per (task, seed) cell, in points, and the values "max"/"min" resolved to.

    A term is the mean of its rows in the cell ("max"/"min" resolved per task); terms are summed with their
    coefficients on the cells they share. Rows with NaN in ``metric`` are dropped (pixel AUROC without masks).
    A mean over a list of :data:`COMPLETE_COLUMNS` values (the four corruptions) keeps only the cells that hold
    every value: a mean over the corruptions run so far is not the paper's mean."""
    if metric not in df.columns:
        return _no_cells(), {}
    tcol = task_column(df)
    df = df.assign(_v=_to_percent(df[metric], metric), _task=df[tcol].astype(str) if tcol else "-",
                   _seed=df["seed"] if "seed" in df.columns else 0)
    terms = [(1.0, selector)] if isinstance(selector, dict) else [(float(c), w) for c, w in selector]
    total, resolved = None, {}
    for coef, where in terms:
        parts = []
        for _, g in df.groupby("_task", sort=True):
            sub, res = _select(g, where)
            for k, v in res.items():
                resolved.setdefault(k, set()).add(v)
            sub = sub.dropna(subset=["_v"])
            for col in (c for c in COMPLETE_COLUMNS if isinstance(where.get(c), (list, tuple))):
                sub = sub.groupby("_seed").filter(lambda cell, c=col, want=set(where[col]): want <= set(cell[c]))
            if not sub.empty:
                parts.append(coef * sub.groupby(["_task", "_seed"])["_v"].mean())
        if not parts:
            return _no_cells(), resolved
        term = pd.concat(parts)
        total = term if total is None else total.add(term)  # NaN where a term lacks the cell
    total = total.dropna().rename_axis(["task", "seed"])
    return total, {k: sorted(v) for k, v in resolved.items()}


# ----------------------------------------------------------------------------------------------------
# One claim
# ----------------------------------------------------------------------------------------------------


def _our_backbone(df: pd.DataFrame, context: dict) -> str | None:
    if "backbone" in df.columns and df["backbone"].notna().any():
        return ", ".join(sorted(map(str, df["backbone"].dropna().unique())))
    return (context or {}).get("backbone")


def comparability(claim: Claim, tasks: list, backbone: str | None) -> tuple[bool, str]:
    """Whether an absolute claim can be held against our number, and the differences if not."""
    diffs = []
    want = BACKBONE_IDS.get(claim.paper_backbone, claim.paper_backbone)
    if backbone != want:
        diffs.append(f"backbone {backbone or 'unknown'} vs the paper's {claim.paper_backbone}")
    if claim.data_tasks is not None and set(tasks) != set(claim.data_tasks):
        diffs.append(f"data {', '.join(tasks)} vs the paper's {claim.paper_data}")
    return (not diffs), "; ".join(diffs)


def _stage_rows(df: pd.DataFrame, stage: str) -> pd.DataFrame:
    """The rows of ``stage`` (:func:`lib.common.corruptions.stage_of`); clean rows serve every stage."""
    keep = stage_of(df) == stage
    if "condition" in df.columns:
        keep |= df["condition"] == "clean"
    return df[keep]


def _schedule(df: pd.DataFrame, context: dict) -> pd.Series:
    """``epochs x iterations`` of every DPDL run (column ``schedule`` "50x20x16", else the profile's)."""
    if "schedule" in df.columns:
        return df["schedule"].astype(str).map(lambda s: "x".join(re.findall(r"\d+", s)[:2]))
    return pd.Series(context.get("dpdl_schedule") or "unknown", index=df.index)


def _describe(where) -> str:
    terms = [(1, where)] if isinstance(where, dict) else list(where)
    text = []
    for coef, w in terms:
        body = ", ".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in w.items())
        text.append(body if len(terms) == 1 else f"{'+' if coef > 0 else '-'}({body})")
    return " ".join(text)


def _methods(claim: Claim) -> str:
    found = []
    for side in (claim.a, claim.b):
        for _, w in ([(1, side)] if isinstance(side, dict) else list(side or ())):
            v = w.get("method")
            for m in ([v] if isinstance(v, str) else list(v or ())):
                found += [m] if m not in found else []
    return ",".join(found) or "<methods>"


def produce_command(claim: Claim, context: dict, stage: str) -> str:
    stem = claim.files[0]
    fill = dict(profile=context.get("profile", "<profile>"), stage=stage, methods=_methods(claim),
                tasks=",".join(context.get("tasks") or ()) or "<tasks>", notebook=stem[:2])
    if stem in COMMANDS:
        return COMMANDS[stem].format(**fill)
    return NOTEBOOK_COMMAND.format(**fill) + (f" --set corruption.stage={stage}" if claim.paper == "roda" else "")


def _answer(claim: Claim, results: dict, stage: str, context: dict):
    """(the table that answers the claim, its stem, why the others did not)."""
    tried = []
    for stem in claim.files:
        df = results.get(stem)
        if df is None:
            tried.append(f"08_roda_grid.csv not found (the grid's runs of these rows, {stem})" if stem in GRID_VIEWS
                         else f"{stem}.csv not found")
            continue
        if claim.paper == "roda":
            staged = _stage_rows(df, stage)
            if staged.empty:
                have = sorted(set(stage_of(df)))
                tried.append(f"{stem}.csv has no {stage}-stage rows (it holds {'/'.join(have)})")
                continue
            df = staged
        if claim.paper == "dpdl":
            sched = _schedule(df, context)
            if (sched == PAPER_SCHEDULE).any():
                df = df[sched == PAPER_SCHEDULE]
        tcol = task_column(df)
        if claim.tasks is not None and tcol:
            df = df[df[tcol].astype(str).isin(claim.tasks)]
        a, _ = side_cells(df, claim.a, claim.metric)
        b = a if claim.b is None else side_cells(df, claim.b, claim.metric)[0]
        if a.empty or b.empty:
            nan_metric = claim.metric in df.columns and len(df) and df[claim.metric].isna().all()
            staged = f" at the {stage} stage" if claim.paper == "roda" else ""
            tried.append(f"no {claim.metric} in {stem}.csv (no masks for this data)" if nan_metric
                         else f"no rows of {stem}.csv match{staged}")
            if nan_metric:
                return None, stem, tried
            continue
        return df, stem, tried
    return None, None, tried


def _row_stats(claim: Claim, df: pd.DataFrame, tasks: list, pa, pb, alpha, n_boot, seed, context) -> dict:
    """Effect, interval and the verdict where no test decides it (absolute claims, not testable)."""
    sub = df[df[task_column(df)].astype(str).isin(tasks)] if task_column(df) else df
    a, res_a = side_cells(sub, claim.a, claim.metric)
    resolved = dict(res_a)
    if claim.kind == "absolute":
        cells, ours_b = a, None
    else:
        b, res_b = side_cells(sub, claim.b, claim.metric)
        for k, v in res_b.items():
            resolved[k] = sorted(set(resolved.get(k, [])) | set(v))
        common = a.index.intersection(b.index)
        a, b = a.loc[common], b.loc[common]
        cells, ours_b = a - claim.scale * b, category_mean(b)
    s = effect_interval(cells, alpha, n_boot, seed)
    row = dict(tasks=", ".join(sorted(set(cells.index.get_level_values("task")))), n_categories=s["n_categories"],
               n_cells=s["n_cells"], ours_a=category_mean(a), ours_b=ours_b, ours_effect=s["estimate"],
               ours_se=s["se"], ci_low=s["low"], ci_high=s["high"], p_value=s["p"],
               resolved="".join(f", {k}={'/'.join(map(str, v))}" for k, v in resolved.items()))
    if s["n_cells"] == 0:
        row.update(verdict="not run", why="the two sides share no category x seed cell")
    elif claim.kind == "absolute":
        ok, reason = comparability(claim, sorted(set(cells.index.get_level_values("task"))), _our_backbone(df, context))
        mismatch = [f"{k} {'/'.join(map(str, resolved[k]))} vs the paper's {v}" for k, v in claim.paper_params.items()
                    if k in resolved and resolved[k] != [v]]
        if not ok or mismatch:
            row.update(verdict="not comparable", why="; ".join(([reason] if reason else []) + mismatch))
        elif math.isnan(s["se"]):
            row.update(verdict="not testable", why="one category x seed cell: no interval")
        else:
            inside = s["low"] <= pa <= s["high"]
            row.update(verdict="reproduced in size" if inside else "not reproduced",
                       why=f"the paper's {pa:.2f} {'inside' if inside else 'outside'} our interval")
        row["p_value"] = float("nan")  # an absolute claim is not a test of zero: no Holm
    elif math.isnan(s["se"]):
        row.update(verdict="not testable", why="one category x seed cell: no replication")
    elif s["se"] == 0 and s["estimate"] == 0:
        row.update(verdict="not testable", why="the two sides are equal in every cell (no variation)",
                   p_value=float("nan"))
    return row


def evaluate_claim(claim: Claim, reference: pd.DataFrame, results: dict, context: dict | None = None,
                   stage: str = PAPER_STAGE, alpha: float = ALPHA, n_boot: int = N_BOOTSTRAP,
                   seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """Rows of the fidelity table for one claim: one over its counted categories, one over its shortcut
    categories (image AUROC only), before Holm (rows still to be tested have verdict None)."""
    context = dict(context or {})
    pa, pb = paper_value(reference, claim.paper_a), paper_value(reference, claim.paper_b)
    source = ", ".join(sorted(set(reference.set_index("key").loc[list(claim.paper_a + claim.paper_b), "table"])))
    paper_effect = (pa - claim.scale * pb) if (pa is not None and pb is not None) else pa
    base = dict(claim_id=claim.id, paper=claim.paper, claim=claim.text, kind=claim.kind,
                paper_source=source or "figure", stage=stage if claim.paper == "roda" else "-", metric=claim.metric,
                filter=_describe(claim.a) + ("" if claim.b is None else f" vs {_describe(claim.b)}"),
                paper_value=f"figure only: {claim.figure_only}" if claim.figure_only else "",
                paper_a=pa, paper_b=pb, paper_effect=paper_effect, expect=claim.expect, counted=True, caveat="",
                label_a=claim.label_a, label_b=claim.label_b)
    df, stem, tried = _answer(claim, results, stage, context)
    if df is None:
        if stem is not None:  # the metric is missing for this data
            return [dict(base, file=stem, verdict="not comparable", why="; ".join(tried))]
        if claim.tasks is not None and not set(claim.tasks) & set(context.get("dpdl_tasks") or ()):
            return []  # a per-dataset claim about a dataset this profile does not run
        return [dict(base, file=claim.files[0], verdict="not run",
                     why="; ".join(tried) + f"; produce it with: {produce_command(claim, context, stage)}")]
    tcol = task_column(df)
    tasks = sorted(map(str, df[tcol].dropna().unique())) if tcol else ["-"]
    shortcut = shortcut_aurocs(results) if claim.metric in IMAGE_METRICS else {}
    flagged = [t for t in tasks if shortcut.get(t, 0.0) > SHORTCUT_MAX]
    groups = [(g, is_shortcut) for g, is_shortcut in (([t for t in tasks if t not in flagged], False), (flagged, True))
              if g]
    caveat = []
    if claim.paper == "dpdl":
        used = sorted(set(_schedule(df, context)) - {"unknown"})  # not recorded anywhere: no evidence against it
        if used and used != [PAPER_SCHEDULE]:
            rerun = NOTEBOOK_COMMAND.format(profile=context.get("profile", "<profile>"), notebook="05")
            caveat.append(f"DPDL schedule {'/'.join(used)} (epochs x iterations), not the paper's 50 x 20; rerun: "
                          f"{rerun} --set dpdl.epochs=50 --set dpdl.iterations=20")
    rows = []
    for group, is_shortcut in groups:
        row = dict(base, file=stem, **_row_stats(claim, df, group, pa, pb, alpha, n_boot, seed, context))
        notes = list(caveat)
        if is_shortcut:
            notes.append("grey-level shortcut AUROC " + ", ".join(f"{t} {shortcut[t]:.2f}" for t in group)
                         + f" > {SHORTCUT_MAX:g}: image AUROC there measures the grey level; reported, not counted")
        row.update(counted=not notes, caveat="; ".join(notes),
                   data=f"paper: {claim.paper_backbone} on {claim.paper_data}; ours: "
                        f"{_our_backbone(df, context) or 'backbone ?'} on {row['tasks']}{row.pop('resolved')}"
                        + (f"; {claim.note}" if claim.note else ""))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("claim_id", "paper", "claim", "kind", "paper_source", "stage", "file", "filter", "metric", "tasks",
                 "n_categories", "n_cells", "paper_value", "paper_a", "paper_b", "paper_effect", "ours_a", "ours_b",
                 "ours_effect", "ours_se", "ci_low", "ci_high", "p_value", "p_holm", "verdict", "counted", "caveat",
                 "why", "data")


def _why(row: dict, reason: str) -> str:
    """``ours +3.10 [-1.20, +7.40] over 3 categories, 9 cells; paper +7.69; p=.., Holm ..: <reason>``."""
    if pd.isna(row.get("ours_effect")):
        return reason
    fmt = "{:.2f}" if row["kind"] == "absolute" else "{:+.2f}"
    n = int(row["n_categories"])
    text = "ours " + fmt.format(row["ours_effect"])
    if not pd.isna(row["ci_low"]):
        text += f" [{fmt.format(row['ci_low'])}, {fmt.format(row['ci_high'])}]"
    text += f" over {n} categor{'y' if n == 1 else 'ies'}, {int(row['n_cells'])} cells"
    if not pd.isna(row["paper_effect"]):
        text += "; paper " + fmt.format(row["paper_effect"])
    if not pd.isna(row.get("p_holm")):
        text += f"; p={row['p_value']:.3g}, Holm {row['p_holm']:.3g}"
    return f"{text}: {reason}"


def fidelity_table(claims, reference_df: pd.DataFrame, ours, context: dict | None = None, alpha: float = ALPHA,
                   stage: str = PAPER_STAGE, n_boot: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """The fidelity table: per claim our effect and interval beside the paper's, p, Holm's p, verdict, counted.

    ``ours``: a results folder or a dict ``stem -> DataFrame | None`` (see :data:`RESULT_FILES`). ``context``:
    facts our files do not hold: ``backbone``, ``profile`` and ``tasks`` (for the commands of claims not run),
    ``dpdl_tasks`` (per-dataset DPDL claims of datasets outside it are left out), ``dpdl_schedule`` ("50x20")
    for runs without a ``schedule`` column. ``stage``: the corruption stage RoDA's claims read."""
    results = load_results(ours) if isinstance(ours, (str, Path)) else dict(ours)
    rows = [row for claim in claims for row in evaluate_claim(claim, reference_df, results, context, stage, alpha,
                                                              n_boot, seed)]
    table = pd.DataFrame(rows)
    for col in (*TABLE_COLUMNS, "kind", "expect"):
        if col not in table.columns:
            table[col] = None
    table["p_holm"] = np.nan
    if len(table):
        tested = table["verdict"].isna() & table["p_value"].notna()
        for _, idx in table[tested].groupby("paper").groups.items():
            table.loc[idx, "p_holm"] = holm(table.loc[idx, "p_value"].astype(float))
        for i in table.index:
            row = table.loc[i].to_dict()
            if tested[i]:
                expect = None if pd.isna(row["expect"]) else int(row["expect"])
                paper_effect = None if pd.isna(row["paper_effect"]) else float(row["paper_effect"])
                v, reason = verdict(row["ours_effect"], row["ci_low"], row["ci_high"], row["p_holm"], paper_effect,
                                    expect, alpha)
                table.at[i, "verdict"] = v
                row["why"] = reason
            if not row["paper_value"] and not pd.isna(row["paper_effect"]):
                table.at[i, "paper_value"] = _paper_text(row)
            table.at[i, "why"] = _why({**row, "p_holm": table.at[i, "p_holm"]}, row["why"])
    table["counted"] = table["counted"].astype(bool)
    return table[list(TABLE_COLUMNS)]


def profile_context(cfg, dpdl_tasks=None) -> dict:
    """The ``context`` of :func:`fidelity_table` for a resolved profile (``lib.experiments.profiles``):
    backbone, profile name, tasks, DPDL tasks (``dpdl_tasks`` where the run named its own) and schedule."""
    dp = cfg.dpdl
    return dict(backbone=cfg.backbone, profile=cfg.name, tasks=list(cfg.tasks),
                dpdl_tasks=list(dpdl_tasks or dp["tasks"]), dpdl_schedule=f"{dp['epochs']}x{dp['iterations']}")


def _paper_text(row: dict) -> str:
    if row["kind"] == "absolute":
        return f"{row['paper_a']:.2f}"
    text = f"{row['label_a']} {row['paper_a']:.2f} vs {row['label_b']} {row['paper_b']:.2f}"
    return text + (f" (ratio {100 * row['paper_a'] / row['paper_b']:.1f}%)" if row["kind"] == "ratio" else "")


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Verdict counts per paper, counted rows only."""
    counted = table[table["counted"].astype(bool)]
    return counted.groupby(["paper", "verdict"]).size().unstack(fill_value=0)
