"""Paper vs. ours: the claims of RoDA and DPDL, our numbers for each, and a verdict from a statistical test.

The claims are data (:mod:`lib.reporting.claims`: one row per comparison, expanded into :class:`Claim` objects);
:func:`fidelity_table` runs one loop over them. A claim names the paper rows it rests on (keys of
``references/paper_numbers.csv``) and how to compute the same quantity from ``results/<profile>/*.csv``.

Kinds: ``"order"`` / ``"gap"`` (A above or below B; the paper's sign decides, ``gap`` also reports the share
of the paper's margin we recover), ``"ratio"`` (A >= scale x B, Table 5's "20% reaches 98% of 100%") and
``"absolute"`` (a value, only comparable with the paper's backbone on the paper's data).

The test (:func:`difference_test`). The result tables hold one AUROC per (task, method, condition, seed). The
test uses the paired per-seed differences d_s = A_s - scale * B_s (s = 1..n seeds) and the sampling error of
the test split, which does not shrink with more seeds because every seed is scored on the same images::

    se^2 = var_s(d) / n  +  se_split(A)^2 + scale^2 se_split(B)^2

``se_split`` of an AUROC is Hanley & McNeil's (1982) standard error from the split's normal / anomalous
counts (columns ``test_normal`` / ``test_anomaly`` of the DPDL runs; the ``target eval`` row of
``01_target_split.csv`` for the RoDA tables); of a share (Fig. 5a) the binomial sqrt(p(1-p)/n). Treating A
and B as independent ignores their positive correlation on the same images, so the test is conservative.
Rows averaged on the same images (the mean over corruptions) take the mean of their errors (the perfectly
correlated bound); tasks pooled into the paper's class mean are independent. The reference is the normal
distribution when ``se_split`` is known, else Student's t with n - 1 degrees of freedom; two-sided, level
``alpha`` (0.05). Pixel AUROC has no split error (pixels of one image are not independent): seeds only.
Where a runner also wrote per-image scores (``<stem>_scores.csv``), the split error of a pairwise AUROC claim
is DeLong's paired one instead (:func:`delong_se`), which keeps the correlation of A and B on the same images.

Verdicts: **reproduced** when the difference is significant in the paper's direction; **not reproduced**
when it is significant the other way; **not significant** otherwise, or when there is no error estimate
(one seed and no split size). Absolute claims: **reproduced** when the paper's value lies inside our
1 - alpha interval, **not reproduced** when it lies outside. **not comparable**: an absolute number with
another backbone or on other data, or a metric our data cannot give; **not run**: the result is missing.
Our AUROCs are fractions, the paper's percents: everything here is in percent points.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from lib.common.utils import REPO_ROOT
from lib.reporting.claims import ALL_CLAIMS, DPDL_CLAIMS, RODA_CLAIMS, Claim, reference_key, slug

REFERENCE_CSV = REPO_ROOT / "references" / "paper_numbers.csv"
REFERENCE_COLUMNS = ("key", "paper", "source", "table", "dataset", "category", "setting", "method", "metric",
                     "value", "std", "printed", "backbone", "note")
RESULT_FILES = ("01_target_split", "02_patchcore", "03_roda", "04_table4", "04_table5", "04_fig5a", "04_fig5b",
                "05_general_runs", "05_hard_runs", "05_ablation_runs")
PERCENT_METRICS = {"image_auroc", "pixel_auroc", "auc_pr", "auroc", "share_assigned"}
AUROC_METRICS = {"image_auroc", "auroc"}  # metrics with a split error from the image counts
TASK_COLUMNS = ("task", "dataset")
BACKBONE_IDS = {"WRN-50": "wide_resnet50_2", "ResNet-18": "resnet18"}
ALPHA = 0.05
SCORES = "_scores"  # <stem>_scores.csv: the table's columns (one row per image) + image, label, score
__all__ = ["ALL_CLAIMS", "DPDL_CLAIMS", "RODA_CLAIMS", "Claim", "reference_key", "slug", "fidelity_table",
           "load_reference", "load_results", "summary", "verdict", "difference_test", "auroc_se"]


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def load_reference(path=None) -> pd.DataFrame:
    """``references/paper_numbers.csv`` as a DataFrame (values in percent)."""
    df = pd.read_csv(path or REFERENCE_CSV, dtype={"category": str})
    missing = set(REFERENCE_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"{path or REFERENCE_CSV} lacks columns {sorted(missing)}")
    return df


def load_results(results_dir) -> dict:
    """Our result tables in ``results_dir``: stem -> DataFrame, or None where the file is missing; also the
    per-image score tables ``<stem>_scores`` where a runner wrote them (see :func:`delong_se`)."""
    results_dir = Path(results_dir)
    stems = [*RESULT_FILES, *(f"{stem}{SCORES}" for stem in RESULT_FILES)]
    found = {stem: (pd.read_csv(results_dir / f"{stem}.csv") if (results_dir / f"{stem}.csv").exists() else None)
             for stem in stems}
    return {k: v for k, v in found.items() if v is not None or not k.endswith(SCORES)}


def paper_value(reference: pd.DataFrame, keys) -> float | None:
    """Mean of the reference rows ``keys`` (None for no keys). Unknown keys raise KeyError."""
    if not keys:
        return None
    indexed = reference.set_index("key")["value"]
    missing = [k for k in keys if k not in indexed.index]
    if missing:
        raise KeyError(f"not in the reference file: {missing}")
    return float(indexed.loc[list(keys)].astype(float).mean())


# ----------------------------------------------------------------------------------------------------
# Our side: per-seed values and the split's sampling error
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


def auroc_se(auc, n_pos, n_neg):
    """Hanley & McNeil (1982) standard error of an AUROC ``auc`` in [0, 1] on ``n_pos`` / ``n_neg`` images:
    se^2 = [A(1-A) + (n_pos-1)(Q1-A^2) + (n_neg-1)(Q2-A^2)] / (n_pos n_neg), Q1 = A/(2-A), Q2 = 2A^2/(1+A)."""
    a = np.asarray(auc, float)
    n1, n0 = np.asarray(n_pos, float), np.asarray(n_neg, float)
    q1, q2 = a / (2 - a), 2 * a ** 2 / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a ** 2) + (n0 - 1) * (q2 - a ** 2)) / (n1 * n0)
    return np.sqrt(np.clip(var, 0.0, None))


def split_se(df: pd.DataFrame, metric: str, split_sizes: dict | None = None) -> pd.Series:
    """Per-row sampling error of ``metric`` (percent points) from the test split; NaN where unknown.

    AUROC: :func:`auroc_se` with the row's ``test_anomaly`` / ``test_normal``, else ``split_sizes[task] =
    (normal, anomalous)``. ``share_assigned``: binomial over ``n_anomalous_patches``. Anything else: NaN."""
    nan = pd.Series(np.nan, index=df.index)
    if metric not in df.columns:
        return nan
    value = df[metric].astype(float)
    frac = value / 100.0 if value.abs().max() > 1.0 + 1e-9 else value
    if metric == "share_assigned" and "n_anomalous_patches" in df.columns:
        return pd.Series(100 * np.sqrt(frac * (1 - frac) / df["n_anomalous_patches"].astype(float)), index=df.index)
    if metric not in AUROC_METRICS:
        return nan
    if {"test_normal", "test_anomaly"} <= set(df.columns):
        n_neg, n_pos = df["test_normal"].astype(float), df["test_anomaly"].astype(float)
    else:
        tcol = task_column(df)
        if not split_sizes or tcol is None:
            return nan
        sizes = df[tcol].map(lambda t: split_sizes.get(str(t), (np.nan, np.nan)))
        n_neg, n_pos = sizes.map(lambda s: s[0]).astype(float), sizes.map(lambda s: s[1]).astype(float)
    return pd.Series(100 * auroc_se(frac, n_pos, n_neg), index=df.index)


def split_sizes_from(results: dict) -> dict:
    """task -> (normal, anomalous) of the RoDA evaluation split (``01_target_split.csv``, ``target eval``)."""
    df = results.get("01_target_split")
    if df is None or "split" not in df.columns:
        return {}
    rows = df[df["split"] == "target eval"]
    return {str(r.task): (float(r.normal), float(r.anomalous)) for r in rows.itertuples()}


def ours_per_seed(df: pd.DataFrame, selector, metric: str, split_sizes: dict | None = None):
    """(per-seed values in percent points, the split error of their mean, resolved "max"/"min" values).

    Each term is the mean of its rows per seed; terms are summed with their coefficients on the seeds they
    share. Rows with NaN in ``metric`` are dropped (e.g. pixel AUROC without masks). The split error of a
    term is the mean of its rows' errors (rows on the same images); terms combine as independent."""
    terms = [(1.0, selector)] if isinstance(selector, dict) else [(float(c), w) for c, w in selector]
    total, var, resolved = None, 0.0, {}
    for coef, where in terms:
        sub, res = _select(df, where)
        for k, v in res.items():
            resolved.setdefault(k, [])
            if v not in resolved[k]:
                resolved[k].append(v)
        if metric in sub.columns:
            sub = sub.assign(_v=_to_percent(sub[metric], metric), _se=split_se(sub, metric, split_sizes))
            sub = sub.dropna(subset=["_v"])
        if sub.empty or metric not in sub.columns:
            return pd.Series(dtype=float), float("nan"), resolved
        seeds = sub["seed"] if "seed" in sub.columns else pd.Series(0, index=sub.index)
        per_seed = coef * sub.groupby(seeds)["_v"].mean()
        var += (coef * sub["_se"].mean(skipna=False)) ** 2
        total = per_seed if total is None else total.add(per_seed, fill_value=None).dropna()
    return total, math.sqrt(var), resolved


def placements(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placement values: for each anomalous image the share of normal images scored below it (ties
    1/2), for each normal image the share of anomalous ones scored above it; AUROC = mean of the first.
    Midrank form (Sun & Xu 2014): V10 = (rank in all - rank among anomalous) / n_normal."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, float)
    pos, neg = scores[labels], scores[~labels]
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    v10 = (ranks[: pos.size] - stats.rankdata(pos)) / neg.size
    v01 = 1.0 - (ranks[pos.size:] - stats.rankdata(neg)) / pos.size
    return v10, v01


def _side_placements(df: pd.DataFrame, where: dict):
    """Placements per image of one side, averaged over its groups (e.g. corruptions of the same images)."""
    sub, _ = _select(df, where)
    keys = [c for c in sub.columns if c not in ("image", "label", "score")]
    v10s, v01s = [], []
    for _, g in sub.groupby(keys, dropna=False) if keys else [(None, sub)]:
        g = g.sort_values("image")
        v10, v01 = placements(g["label"], g["score"])
        v10s.append(pd.Series(v10, index=g["image"][g["label"] == 1].to_numpy()))
        v01s.append(pd.Series(v01, index=g["image"][g["label"] == 0].to_numpy()))
    if not v10s or any(not v.index.equals(v10s[0].index) for v in v10s):
        return None
    return sum(v10s) / len(v10s), sum(v01s) / len(v01s)


def delong_se(claim: Claim, scores: pd.DataFrame | None, tasks, seeds, tcol) -> float | None:
    """The paired split error of A - scale B (percent points) from per-image scores, or None.

    DeLong, DeLong & Clarke-Pearson (1988): with placements V10 (anomalous) and V01 (normal) of both sides on
    the same images, Var(AUC_A - s AUC_B) = Var(V10_A - s V10_B) / m + Var(V01_A - s V01_B) / n, which keeps the
    positive correlation of two methods on the same images (Hanley-McNeil must drop it). Averaged over seeds.
    Used for single-task, single-term pairwise claims whose file has a ``<stem>_scores`` table."""
    if (scores is None or claim.kind == "absolute" or claim.pool_tasks or not isinstance(claim.a, dict)
            or not isinstance(claim.b, dict) or claim.metric not in AUROC_METRICS or not seeds):
        return None
    if tcol in scores.columns:
        scores = scores[scores[tcol].astype(str).isin(tasks)]
    variances = []
    for seed in seeds:
        df = scores[scores["seed"] == seed] if "seed" in scores.columns else scores
        a, b = _side_placements(df, claim.a), _side_placements(df, claim.b)
        if a is None or b is None or not (a[0].index.equals(b[0].index) and a[1].index.equals(b[1].index)):
            return None
        d10, d01 = a[0] - claim.scale * b[0], a[1] - claim.scale * b[1]
        if len(d10) < 2 or len(d01) < 2:
            return None
        variances.append(d10.var(ddof=1) / len(d10) + d01.var(ddof=1) / len(d01))
    return 100.0 * math.sqrt(float(np.mean(variances)))


# ----------------------------------------------------------------------------------------------------
# The test and the verdict
# ----------------------------------------------------------------------------------------------------


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def difference_test(diffs, se_split: float = float("nan")) -> tuple[float, float, float]:
    """(mean difference, its standard error, two-sided p) for per-seed differences ``diffs`` (see the module
    docstring): se^2 = var_s(d)/n + se_split^2; normal reference when ``se_split`` is known, else t(n-1).
    No error estimate (one seed, no split error): se and p are NaN."""
    d = np.asarray(diffs, float)
    n = d.size
    est = float(d.mean()) if n else float("nan")
    known = not _missing(se_split) and not math.isnan(se_split)
    if n == 0 or (n < 2 and not known):
        return est, float("nan"), float("nan")
    var = (d.var(ddof=1) / n if n > 1 else 0.0) + (se_split ** 2 if known else 0.0)
    se = math.sqrt(var)
    if se == 0.0:
        return est, 0.0, (0.0 if est != 0 else 1.0)
    z = abs(est) / se
    p = 2 * (stats.norm.sf(z) if known else stats.t.sf(z, n - 1))
    return est, se, float(p)


def verdict(claim: Claim, ours_a, ours_b=None, se_a=float("nan"), se_b=float("nan"), comparable: bool = True,
            reason: str = "", paper_a=None, paper_b=None, alpha: float = ALPHA,
            se_diff: float | None = None) -> tuple[str, str, float, float]:
    """(verdict, why, p, se) for per-seed values ``ours_a`` / ``ours_b`` (same seeds, percent points) and the
    split errors ``se_a`` / ``se_b`` of their means (``se_diff``: the paired split error of A - scale B, from
    :func:`delong_se`, used instead where given). ``paper_a``/``paper_b`` give the paper's sign (unless
    ``claim.expect``) and, for absolute claims, the value to match."""
    context = f" ({reason})" if reason else ""
    a = np.atleast_1d(np.asarray(ours_a if ours_a is not None else [], float))
    b = np.atleast_1d(np.asarray(ours_b if ours_b is not None else [], float))
    nan = float("nan")
    if a.size == 0 or np.isnan(a).all() or (claim.kind != "absolute" and (b.size == 0 or np.isnan(b).all())):
        return "not run", reason or "no result for this claim", nan, nan
    if not comparable:
        return "not comparable", reason or "different setting", nan, nan
    level = f"{100 * (1 - alpha):.0f}%"
    if claim.kind == "absolute":
        if _missing(paper_a):
            return "not comparable", "the paper gives no number" + context, nan, nan
        diff, se, p = difference_test(a - paper_a, se_a)
        what = f"ours {a.mean():.2f} vs paper {paper_a:.2f}"
        if math.isnan(se):
            return "not significant", f"{what}: no error estimate (one seed, no split size){context}", p, se
        half = stats.norm.ppf(1 - alpha / 2) * se
        if p >= alpha:
            return "reproduced", f"{what}: inside our {level} interval ±{half:.2f}{context}", p, se
        return "not reproduced", f"{what}: off by {diff:+.2f}, outside ±{half:.2f} (p={p:.3g}){context}", p, se

    expect, paper_diff = claim.expect, None
    if not _missing(paper_a) and not _missing(paper_b):
        paper_diff = paper_a - claim.scale * paper_b
        if expect is None:
            expect = int(np.sign(paper_diff))
    if not expect:
        return "not comparable", "the paper gives no direction for this claim" + context, nan, nan
    se_split = se_diff if se_diff is not None else math.sqrt(se_a ** 2 + (claim.scale * se_b) ** 2)
    diff, se, p = difference_test(a - claim.scale * b, se_split)
    scaled = f"{claim.scale:g} x " if claim.scale != 1 else ""
    what = f"ours {claim.label_a} - {scaled}{claim.label_b} = {diff:+.2f}"
    what += f" ± {se:.2f}" if not math.isnan(se) else ""
    if paper_diff is not None:
        what += f" (paper {paper_diff:+.2f})"
    extra = f"; {100 * diff / paper_diff:.0f}% of the paper's gap" if claim.kind == "gap" and paper_diff else ""
    if math.isnan(se):
        return "not significant", f"{what}: no error estimate (one seed, no split size){extra}{context}", p, se
    word = ("meets the bound" if claim.kind == "ratio" else f"{claim.label_a} {'above' if expect > 0 else 'below'} "
            f"{claim.label_b}")
    if p >= alpha:
        return "not significant", f"{what}: p={p:.3g} >= {alpha:g}{extra}{context}", p, se
    if expect * diff > 0:
        return "reproduced", f"{what}: {word}, p={p:.3g}{extra}{context}", p, se
    return "not reproduced", f"{what}: significant in the opposite direction, p={p:.3g}{extra}{context}", p, se


# ----------------------------------------------------------------------------------------------------
# Comparability and the table
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


def _fmt(values: pd.Series) -> str:
    n = int(values.size)
    if n == 0:
        return "-"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}" if n > 1 else f"{values.mean():.2f} (1 seed)"


def _paper_text(claim: Claim, reference: pd.DataFrame, pa, pb) -> str:
    if claim.figure_only:
        return f"figure only: {claim.figure_only}"
    if claim.kind == "absolute":
        return f"{pa:.2f}"
    text = f"{claim.label_a} {pa:.2f} vs {claim.label_b} {pb:.2f}"
    if claim.kind == "ratio":
        text += f" (ratio {100 * pa / pb:.1f}%)"
    if len(claim.paper_a) > 1 and len(claim.paper_a) == len(claim.paper_b):
        va = reference.set_index("key").loc[list(claim.paper_a), "value"].to_numpy(float)
        vb = reference.set_index("key").loc[list(claim.paper_b), "value"].to_numpy(float)
        text += f"; mean of {len(va)}, {claim.label_a} ahead in {int(np.sum(va > claim.scale * vb))}/{len(va)}"
    return text


def _side(claim, selector, sub, tcol, group, sizes):
    """Per-seed values, split error and resolved extremes of one side, pooling tasks where the claim does."""
    if selector is None:
        return pd.Series(dtype=float), float("nan"), {}
    if not (claim.pool_tasks and tcol and len(group) > 1):
        return ours_per_seed(sub, selector, claim.metric, sizes)
    parts = [ours_per_seed(sub[sub[tcol] == t], selector, claim.metric, sizes) for t in group]
    values = pd.concat([s for s, _, _ in parts], axis=1).mean(axis=1, skipna=False).dropna()
    se = math.sqrt(sum(e ** 2 for _, e, _ in parts)) / len(parts)
    return values, se, {}


def evaluate_claim(claim: Claim, reference: pd.DataFrame, results: dict, context: dict | None = None,
                   alpha: float = ALPHA, skip_absent_tasks: bool = True) -> list[dict]:
    """Rows of the fidelity table for one claim (one per task, or one pooled)."""
    pa, pb = paper_value(reference, claim.paper_a), paper_value(reference, claim.paper_b)
    source = ", ".join(sorted(set(reference.set_index("key").loc[list(claim.paper_a + claim.paper_b), "table"])))
    base = dict(claim_id=claim.id, paper=claim.paper, claim=claim.text, paper_source=source or "figure",
                paper_value=_paper_text(claim, reference, pa, pb), paper_a=pa, paper_b=pb,
                paper_diff=(pa - claim.scale * pb) if (pa is not None and pb is not None) else None)
    df = results.get(claim.file)
    if df is None and claim.tasks is not None and skip_absent_tasks:
        return []  # a per-dataset claim: without the file we cannot tell whether the dataset would be run
    if df is None:
        return [dict(base, task="-", ours="-", n_seeds=0, verdict="not run",
                     why=f"{claim.file}.csv not found: notebook {claim.file[:2]} was not run for this profile")]
    tcol = task_column(df)
    tasks = [t for t in (sorted(map(str, df[tcol].dropna().unique())) if tcol else ["-"])
             if claim.tasks is None or t in claim.tasks]
    if not tasks:
        return [] if skip_absent_tasks else [dict(base, task="-", ours="-", n_seeds=0, verdict="not run",
                                                  why=f"no task of {claim.file}.csv matches {claim.tasks}")]
    sizes = split_sizes_from(results)
    backbone = _our_backbone(df, context or {})
    rows = []
    for label, group in ([(", ".join(tasks), tasks)] if claim.pool_tasks else [(t, [t]) for t in tasks]):
        sub = df[df[tcol].astype(str).isin(group)] if tcol else df
        sa, se_a, resolved = _side(claim, claim.a, sub, tcol, group, sizes)
        sb, se_b, res_b = _side(claim, claim.b, sub, tcol, group, sizes)
        for k, vs in res_b.items():
            resolved[k] = resolved.get(k, []) + [v for v in vs if v not in resolved.get(k, [])]
        if claim.b is not None:  # pair the seeds both sides have
            common = sa.index.intersection(sb.index)
            sa, sb = sa.loc[common], sb.loc[common]
        n = int(sa.size)
        ctx = f"paper: {claim.paper_backbone} on {claim.paper_data}; ours: {backbone or 'backbone ?'} on {label}, "
        ctx += f"{n} seed{'s' if n != 1 else ''}"
        ctx += "".join(f", {k}={'/'.join(map(str, v))}" for k, v in resolved.items())
        ctx += f"; {claim.note}" if claim.note else ""
        p = se = float("nan")
        if n == 0:
            if claim.metric in df.columns and df[claim.metric].isna().all():
                v, why = "not comparable", f"no {claim.metric} in our results (no masks for this data); {ctx}"
            else:
                v, why = "not run", f"no rows of {claim.file}.csv match this claim; {ctx}"
        else:
            comparable, diff_reason = True, ""
            if claim.kind == "absolute":
                comparable, diff_reason = comparability(claim, group, backbone)
                mismatch = [f"{k} {'/'.join(map(str, resolved[k]))} vs the paper's {v}"
                            for k, v in claim.paper_params.items() if k in resolved and resolved[k] != [v]]
                comparable = comparable and not mismatch
                diff_reason = "; ".join(([diff_reason] if diff_reason else []) + mismatch)
            se_diff = delong_se(claim, results.get(claim.file + SCORES), group, list(sa.index), tcol)
            ctx += "; paired DeLong split error" if se_diff is not None else ""
            v, why, p, se = verdict(claim, sa.to_numpy(), sb.to_numpy() if claim.b is not None else None, se_a, se_b,
                                    comparable, diff_reason + ("; " if diff_reason else "") + ctx, pa, pb, alpha,
                                    se_diff)
        pair = claim.kind != "absolute" and claim.b is not None
        rows.append(dict(base, task=label, n_seeds=n, verdict=v, why=why, p_value=p, ours_se=se,
                         ours=f"{claim.label_a} {_fmt(sa)} vs {claim.label_b} {_fmt(sb)}" if pair else _fmt(sa),
                         ours_a=sa.mean() if n else float("nan"),
                         ours_b=(sb.mean() if n else float("nan")) if pair else None,
                         ours_diff=float((sa - claim.scale * sb).mean()) if pair and n else None,
                         ours_std_a=sa.std(ddof=1) if n > 1 else 0.0,
                         ours_std_b=(sb.std(ddof=1) if n > 1 else 0.0) if pair else None))
    return rows


TABLE_COLUMNS = ("claim_id", "paper", "claim", "paper_source", "task", "paper_value", "ours", "n_seeds", "verdict",
                 "why", "p_value", "paper_a", "paper_b", "paper_diff", "ours_a", "ours_b", "ours_diff", "ours_se",
                 "ours_std_a", "ours_std_b")


def fidelity_table(claims, reference_df: pd.DataFrame, ours, context: dict | None = None, alpha: float = ALPHA,
                   skip_absent_tasks: bool = True) -> pd.DataFrame:
    """The fidelity table: claim, paper value(s), ours mean ± std, verdict, p, why.

    ``ours``: a results folder or a dict ``stem -> DataFrame | None`` (see :data:`RESULT_FILES`).
    ``context``: facts our files do not hold, e.g. ``{"backbone": cfg.backbone}``. ``alpha``: the test's level.
    Claims tied to tasks we did not run are left out (``skip_absent_tasks``; per-dataset claims are also left
    out when their file is missing); a missing file gives "not run" for the other claims."""
    results = load_results(ours) if isinstance(ours, (str, Path)) else dict(ours)
    rows = [row for claim in claims for row in evaluate_claim(claim, reference_df, results, context, alpha,
                                                              skip_absent_tasks)]
    table = pd.DataFrame(rows)
    for col in TABLE_COLUMNS:
        if col not in table.columns:
            table[col] = None
    return table[list(TABLE_COLUMNS)]


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Verdict counts per paper."""
    return table.groupby(["paper", "verdict"]).size().unstack(fill_value=0)
