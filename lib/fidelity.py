"""Paper vs. ours: the claims of RoDA and DPDL, our numbers for each, and a verdict.

A :class:`Claim` names the paper rows it rests on (keys of ``references/paper_numbers.csv``) and how to
compute the same quantity from our result tables (``results/<profile>/*.csv``). Three kinds:

* ``"order"`` / ``"gap"``: A beats B (or B beats A; the paper's sign decides). ``"gap"`` also reports
  how much of the paper's margin we recover. Verdict (:func:`verdict`): **reproduced** when our mean
  difference has the paper's sign and exceeds a noise margin (default: the larger of 1 AUROC point and the
  pooled std over seeds), **not reproduced** when the sign is opposite beyond the margin, and
  **not reproduced** with the reason "within noise" otherwise.
* ``"ratio"``: A reaches at least ``scale`` x B (Table 5: 20% adaptation >= 98% of the 100% upper bound).
  Reproduced when our A - scale*B >= 0, "within noise" when it falls short by less than the margin.
* ``"absolute"``: a value. Only comparable with the paper's backbone on the paper's data; otherwise
  **not comparable**, and the reason names the difference (backbone, data).

Our AUROCs are fractions in [0, 1]; the paper file holds percents. Everything here is in percent points.
A result file that is missing gives "not run". Our files (``RESULT_FILES``) are those notebooks 02-05 write:
``02_patchcore``, ``03_roda``, ``04_table4``, ``04_table5``, ``04_fig5a``, ``04_fig5b``, and DPDL's per-run
tables ``05_general_runs``, ``05_hard_runs``, ``05_ablation_runs`` (column ``auroc``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .utils import REPO_ROOT

REFERENCE_CSV = REPO_ROOT / "references" / "paper_numbers.csv"
REFERENCE_COLUMNS = ("key", "paper", "source", "table", "dataset", "category", "setting", "method", "metric",
                     "value", "std", "printed", "backbone", "note")
RESULT_FILES = ("02_patchcore", "03_roda", "04_table4", "04_table5", "04_fig5a", "04_fig5b", "05_general_runs",
                "05_hard_runs", "05_ablation_runs")
PERCENT_METRICS = {"image_auroc", "pixel_auroc", "auc_pr", "auroc", "share_assigned"}
TASK_COLUMNS = ("task", "dataset")
BACKBONE_IDS = {"WRN-50": "wide_resnet50_2", "ResNet-18": "resnet18"}
MVTEC_TASKS = tuple(f"mvtec/{c}" for c in (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper"))
CORRUPTIONS = ("gaussian_noise", "defocus_blur", "brightness", "contrast")
VERDICTS = ("reproduced", "not reproduced", "not comparable", "not run")

# where-values: a scalar, a list/tuple/set (any of), "max"/"min" (the extreme present), or a callable
Where = dict
Selector = Any  # a Where, or a tuple of (coefficient, Where) terms that are summed per seed


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9+]+", "_", str(text).lower()).strip("_").replace("+", "p")


def reference_key(paper, table, dataset, setting, method, metric, category=None) -> str:
    """The ``key`` of a row of ``paper_numbers.csv`` (same slugs as the file)."""
    return ":".join([paper, slug(table), slug(dataset), slug(category) if category else "-", slug(setting),
                     slug(method), metric])


@dataclass
class Claim:
    """One checkable statement of a paper.

    ``paper_a`` / ``paper_b``: reference keys (averaged when several). ``file``: our result table (stem).
    ``a`` / ``b``: which of our rows give A and B (a ``Where`` dict, or ``((coef, where), ...)`` summed per
    seed). ``expect``: +1 "A above B", -1 "A below B"; None takes the sign of the paper's numbers.
    ``tasks``: our tasks the claim applies to (None: every task of the file). ``pool_tasks``: average our
    tasks into one number (the paper's class means) instead of one row per task.
    """

    id: str
    paper: str
    text: str
    kind: str
    paper_a: tuple = ()
    paper_b: tuple = ()
    file: str = "03_roda"
    a: Selector = field(default_factory=dict)
    b: Selector = None
    metric: str = "image_auroc"
    label_a: str = "A"
    label_b: str = "B"
    expect: int | None = None
    scale: float = 1.0
    tasks: tuple | None = None
    pool_tasks: bool = False
    paper_backbone: str = "WRN-50"
    paper_data: str = "MVTec AD, mean over 15 classes"
    data_tasks: tuple | None = None  # our tasks that make up the paper's data (absolute claims)
    paper_params: dict = field(default_factory=dict)  # settings that must match for absolute claims
    figure_only: str = ""  # the paper shows it only as a plot: what the text says
    note: str = ""

    def __post_init__(self):
        if self.kind not in ("gap", "order", "absolute", "ratio"):
            raise ValueError(f"claim {self.id}: kind must be gap/order/absolute/ratio, got {self.kind!r}")
        if self.kind != "absolute" and self.b is None:
            raise ValueError(f"claim {self.id}: a {self.kind} claim needs b")


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
    """Our result tables in ``results_dir``: stem -> DataFrame, or None where the file is missing."""
    results_dir = Path(results_dir)
    return {stem: (pd.read_csv(results_dir / f"{stem}.csv") if (results_dir / f"{stem}.csv").exists() else None)
            for stem in RESULT_FILES}


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
# Our side
# ----------------------------------------------------------------------------------------------------


def task_column(df: pd.DataFrame) -> str | None:
    return next((c for c in TASK_COLUMNS if c in df.columns), None)


def _terms(selector) -> list:
    if isinstance(selector, dict):
        return [(1.0, selector)]
    return [(float(c), w) for c, w in selector]


def _select(df: pd.DataFrame, where: Where) -> tuple[pd.DataFrame, dict]:
    """Rows of ``df`` matching ``where``; also the values that "max"/"min" resolved to."""
    resolved = {}
    sub = df
    special = {}
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
        value = sub[col].max() if how == "max" else sub[col].min()
        resolved[col] = value
        sub = sub[sub[col] == value]
    return sub, resolved


def _to_percent(values: pd.Series, metric: str) -> pd.Series:
    values = values.astype(float)
    if metric in PERCENT_METRICS and values.abs().max() <= 1.0 + 1e-9:
        return values * 100.0
    return values


def ours_per_seed(df: pd.DataFrame, selector, metric: str) -> tuple[pd.Series, dict]:
    """The selected quantity per seed (percent points), and the resolved "max"/"min" values.

    Each term is the mean of its rows per seed; terms are summed with their coefficients on the seeds
    they share. Rows with NaN in ``metric`` are dropped (e.g. pixel AUROC without masks)."""
    total, resolved = None, {}
    for coef, where in _terms(selector):
        sub, res = _select(df, where)
        for k, v in res.items():
            resolved.setdefault(k, [])
            if v not in resolved[k]:
                resolved[k].append(v)
        if sub.empty or metric not in sub.columns:
            return pd.Series(dtype=float), resolved
        sub = sub.assign(_v=_to_percent(sub[metric], metric)).dropna(subset=["_v"])
        if sub.empty:
            return pd.Series(dtype=float), resolved
        per_seed = sub.groupby("seed")["_v"].mean() if "seed" in sub.columns else pd.Series([sub["_v"].mean()], index=[0])
        per_seed = coef * per_seed
        total = per_seed if total is None else total.add(per_seed, fill_value=None).dropna()
    return (total if total is not None else pd.Series(dtype=float)), resolved


def _mean_std(series: pd.Series) -> tuple[float, float, int]:
    n = int(series.size)
    if n == 0:
        return float("nan"), float("nan"), 0
    return float(series.mean()), float(series.std(ddof=1)) if n > 1 else 0.0, n


# ----------------------------------------------------------------------------------------------------
# Verdict
# ----------------------------------------------------------------------------------------------------


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def noise_margin(std_a: float = 0.0, std_b: float = 0.0, min_margin: float = 1.0) -> float:
    """The larger of ``min_margin`` (1 AUROC point) and the pooled std sqrt((sa^2 + sb^2) / 2)."""
    pooled = math.sqrt(((std_a or 0.0) ** 2 + (std_b or 0.0) ** 2) / 2.0)
    return max(min_margin, pooled)


def verdict(claim: Claim, ours_a, ours_b=None, std_a=0.0, std_b=0.0, comparable: bool = True, reason: str = "",
            paper_a=None, paper_b=None, margin: float | None = None, min_margin: float = 1.0) -> tuple[str, str]:
    """("reproduced" | "not reproduced" | "not comparable" | "not run", why).

    All numbers in percent points. ``paper_a``/``paper_b`` give the paper's sign (unless ``claim.expect``)
    and, for absolute claims, the value to match. ``comparable=False`` short-circuits to "not comparable"
    with ``reason``."""
    context = f" ({reason})" if reason else ""
    if _missing(ours_a) or (claim.kind != "absolute" and _missing(ours_b)):
        return "not run", reason or "no result for this claim"
    if not comparable:
        return "not comparable", reason or "different setting"
    if claim.kind == "absolute":
        if _missing(paper_a):
            return "not comparable", "the paper gives no number" + context
        m = margin if margin is not None else max(min_margin, std_a or 0.0)
        diff = ours_a - paper_a
        if abs(diff) <= m:
            return "reproduced", f"ours {ours_a:.2f} vs paper {paper_a:.2f}: within {m:.2f}{context}"
        return "not reproduced", f"ours {ours_a:.2f} vs paper {paper_a:.2f}: off by {diff:+.2f} (> {m:.2f}){context}"

    scale = claim.scale
    expect = claim.expect
    paper_diff = None
    if not _missing(paper_a) and not _missing(paper_b):
        paper_diff = paper_a - scale * paper_b
        if expect is None:
            expect = int(np.sign(paper_diff))
    if not expect:
        return "not comparable", "the paper gives no direction for this claim" + context
    diff = ours_a - scale * ours_b
    m = margin if margin is not None else noise_margin(std_a, scale * (std_b or 0.0), min_margin)
    word = "above" if expect > 0 else "below"
    what = f"ours {claim.label_a} - {('%g x ' % scale) if scale != 1 else ''}{claim.label_b} = {diff:+.2f}"
    if paper_diff is not None:
        what += f" (paper {paper_diff:+.2f})"
    extra = ""
    if claim.kind == "gap" and paper_diff:
        extra = f"; {100 * diff / paper_diff:.0f}% of the paper's gap"
    if paper_diff is not None and abs(paper_diff) <= m:
        extra += f"; the paper's own gap {abs(paper_diff):.2f} is inside this margin"
    signed = expect * diff
    if claim.kind == "ratio":
        if signed >= 0:
            return "reproduced", f"{what}: meets the bound{extra}{context}"
        if signed >= -m:
            return "not reproduced", f"{what}: short of the bound, within noise (margin {m:.2f}){extra}{context}"
        return "not reproduced", f"{what}: short of the bound by more than the margin {m:.2f}{extra}{context}"
    if signed > m:
        return "reproduced", f"{what}: {claim.label_a} {word} {claim.label_b} beyond the noise margin {m:.2f}{extra}{context}"
    if signed < -m:
        return "not reproduced", f"{what}: opposite sign beyond the noise margin {m:.2f}{extra}{context}"
    return "not reproduced", f"{what}: within noise (margin {m:.2f}){extra}{context}"


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


def _fmt(mean, std, n) -> str:
    if _missing(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f} (1 seed)"


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


def evaluate_claim(claim: Claim, reference: pd.DataFrame, results: dict, context: dict | None = None,
                   min_margin: float = 1.0, skip_absent_tasks: bool = True) -> list[dict]:
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
    our_tasks = sorted(map(str, df[tcol].dropna().unique())) if tcol else ["-"]
    tasks = [t for t in our_tasks if claim.tasks is None or t in claim.tasks]
    if not tasks:
        if skip_absent_tasks:
            return []
        return [dict(base, task="-", ours="-", n_seeds=0, verdict="not run",
                     why=f"no task of {claim.file}.csv matches {', '.join(claim.tasks)}")]
    groups = [(", ".join(tasks), tasks)] if claim.pool_tasks else [(t, [t]) for t in tasks]
    backbone = _our_backbone(df, context or {})
    rows = []
    for label, group in groups:
        sub = df[df[tcol].astype(str).isin(group)] if tcol else df
        if claim.pool_tasks and tcol and len(group) > 1:
            # the paper's class mean: average tasks per seed (each task weighs the same)
            sa = pd.concat([ours_per_seed(sub[sub[tcol] == t], claim.a, claim.metric)[0] for t in group], axis=1).mean(axis=1, skipna=False).dropna()
            sb = (pd.concat([ours_per_seed(sub[sub[tcol] == t], claim.b, claim.metric)[0] for t in group], axis=1)
                  .mean(axis=1, skipna=False).dropna() if claim.b is not None else pd.Series(dtype=float))
            resolved = {}
        else:
            sa, resolved = ours_per_seed(sub, claim.a, claim.metric)
            sb, res_b = ours_per_seed(sub, claim.b, claim.metric) if claim.b is not None else (pd.Series(dtype=float), {})
            for k, vs in res_b.items():
                resolved[k] = resolved.get(k, []) + [v for v in vs if v not in resolved.get(k, [])]
        if claim.b is not None:  # pair seeds where both sides have them
            common = sa.index.intersection(sb.index)
            if len(common):
                sa, sb = sa.loc[common], sb.loc[common]
        ma, sda, na = _mean_std(sa)
        mb, sdb, nb = _mean_std(sb)
        ours_ctx = f"ours: {backbone or 'backbone ?'} on {label}, {na} seed{'s' if na != 1 else ''}"
        if resolved:
            ours_ctx += ", " + ", ".join(f"{k}={'/'.join(map(str, vs))}" for k, vs in resolved.items())
        mismatch = [f"{k} {'/'.join(map(str, resolved[k]))} vs the paper's {v}"
                    for k, v in claim.paper_params.items() if k in resolved and resolved[k] != [v]]
        ctx = f"paper: {claim.paper_backbone} on {claim.paper_data}; {ours_ctx}"
        if claim.note:
            ctx += f"; {claim.note}"
        if na == 0 or (claim.b is not None and nb == 0):
            metric_absent = claim.metric in df.columns and df[claim.metric].isna().all()
            if metric_absent:
                v, why = "not comparable", f"no {claim.metric} in our results (no masks for this data); {ctx}"
            else:
                v, why = "not run", f"no rows of {claim.file}.csv match this claim; {ctx}"
        else:
            comparable, diff_reason = True, ""
            if claim.kind == "absolute":
                comparable, diff_reason = comparability(claim, group, backbone)
                if mismatch:
                    comparable = False
                    diff_reason = "; ".join(([diff_reason] if diff_reason else []) + mismatch)
            v, why = verdict(claim, ma, mb if claim.b is not None else None, sda, sdb, comparable,
                             diff_reason + ("; " if diff_reason else "") + ctx, pa, pb, min_margin=min_margin)
        if claim.kind == "absolute" or claim.b is None:
            ours_text = _fmt(ma, sda, na)
            ours_diff = None
        else:
            ours_text = f"{claim.label_a} {_fmt(ma, sda, na)} vs {claim.label_b} {_fmt(mb, sdb, nb)}"
            ours_diff = ma - claim.scale * mb if na and nb else None
        rows.append(dict(base, task=label, ours=ours_text, ours_a=ma, ours_b=mb if claim.b is not None else None,
                         ours_diff=ours_diff, ours_std_a=sda, ours_std_b=sdb if claim.b is not None else None,
                         n_seeds=na, verdict=v, why=why))
    return rows


TABLE_COLUMNS = ("claim_id", "paper", "claim", "paper_source", "task", "paper_value", "ours", "n_seeds", "verdict",
                 "why", "paper_a", "paper_b", "paper_diff", "ours_a", "ours_b", "ours_diff", "ours_std_a",
                 "ours_std_b")


def fidelity_table(claims, reference_df: pd.DataFrame, ours, context: dict | None = None, min_margin: float = 1.0,
                   skip_absent_tasks: bool = True) -> pd.DataFrame:
    """The fidelity table: claim, paper value(s), ours mean ± std, verdict, why.

    ``ours``: a results folder or a dict ``stem -> DataFrame | None`` (see :data:`RESULT_FILES`).
    ``context``: facts our files do not hold, e.g. ``{"backbone": cfg.backbone}``.
    Claims tied to tasks we did not run are left out (``skip_absent_tasks``; per-dataset claims are also left
    out when their file is missing); a missing file gives "not run" for the other claims."""
    results = load_results(ours) if isinstance(ours, (str, Path)) else dict(ours)
    rows = []
    for claim in claims:
        rows.extend(evaluate_claim(claim, reference_df, results, context, min_margin, skip_absent_tasks))
    table = pd.DataFrame(rows)
    for col in TABLE_COLUMNS:
        if col not in table.columns:
            table[col] = None
    return table[list(TABLE_COLUMNS)]


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Verdict counts per paper."""
    return table.groupby(["paper", "verdict"]).size().unstack(fill_value=0)


# ----------------------------------------------------------------------------------------------------
# The standard claims
# ----------------------------------------------------------------------------------------------------


def _rk(table, setting, method, metric="image_auroc", dataset="MVTec", category=None, paper="roda"):
    return reference_key(paper, table, dataset, setting, method, metric, category)


def _roda_claims() -> list[Claim]:
    claims = []
    conds = CORRUPTIONS
    main = dict(severity="max")

    def sel(method, cond, **kw):
        return dict(method=method, condition=cond, **main, **kw)

    for c in conds:
        claims.append(Claim(
            f"t1_roda_vs_patchcore_{c}", "roda", f"RoDA beats PatchCore under {c} (Table 1, image AUROC)", "gap",
            (_rk("Table 1", c, "RoDA"),), (_rk("Table 1", c, "PatchCore"),), "03_roda",
            sel("roda", c), sel("patchcore", c), label_a="RoDA", label_b="PatchCore"))
    for c in conds:
        claims.append(Claim(
            f"t1_roda_vs_tttpp_{c}", "roda", f"RoDA beats TTT++ under {c} (Table 1)", "order",
            (_rk("Table 1", c, "RoDA"),), (_rk("Table 1", c, "TTT++"),), "03_roda",
            sel("roda", c), sel("ttt++", c), label_a="RoDA", label_b="TTT++"))
    for c in conds:
        claims.append(Claim(
            f"t1_ttac_vs_patchcore_{c}", "roda", f"TTAC underperforms PatchCore under {c} (Table 1)", "order",
            (_rk("Table 1", c, "TTAC"),), (_rk("Table 1", c, "PatchCore"),), "03_roda",
            sel("ttac", c), sel("patchcore", c), label_a="TTAC", label_b="PatchCore"))
    claims.append(Claim(
        "t1_roda_vs_patchcore_mean", "roda", "RoDA beats PatchCore on the mean over the four corruptions (Table 1)",
        "gap", (_rk("Table 1", "mean", "RoDA"),), (_rk("Table 1", "mean", "PatchCore"),), "03_roda",
        sel("roda", list(conds)), sel("patchcore", list(conds)), label_a="RoDA", label_b="PatchCore"))
    claims.append(Claim(
        "t1_tttpp_vs_patchcore_mean", "roda", "TTT++ improves on PatchCore on MVTec (Table 1 mean)", "order",
        (_rk("Table 1", "mean", "TTT++"),), (_rk("Table 1", "mean", "PatchCore"),), "03_roda",
        sel("ttt++", list(conds)), sel("patchcore", list(conds)), label_a="TTT++", label_b="PatchCore"))
    for c in conds:
        claims.append(Claim(
            f"t3_roda_vs_patchcore_pixel_{c}", "roda", f"RoDA beats PatchCore in pixel AUROC under {c} (Table 3)",
            "gap", (_rk("Table 3", c, "RoDA", "pixel_auroc"),), (_rk("Table 3", c, "PatchCore", "pixel_auroc"),),
            "03_roda", sel("roda", c), sel("patchcore", c), metric="pixel_auroc", label_a="RoDA",
            label_b="PatchCore"))

    # Table 4 (ablations)
    def t4(row, cond):
        return dict(row=row, condition=cond)

    t4_names = dict(no_alignment="no alignment", kl="KL-Div.", moment_matching="Moment Matching",
                    ot_hungarian="OT + Hungarian", ot_continuous="OT + continuous", ot_discrete="OT + discrete",
                    ot_discrete_copy="OT + discrete + direct copy",
                    ot_discrete_augment="OT + discrete + data augment. (RoDA)")
    for c in conds:
        claims.append(Claim(
            f"t4_discrete_vs_continuous_{c}", "roda", f"discrete beats continuous OT under {c} (Table 4)", "order",
            (_rk("Table 4", c, t4_names["ot_discrete"]),), (_rk("Table 4", c, t4_names["ot_continuous"]),),
            "04_table4", t4("ot_discrete", c), t4("ot_continuous", c), label_a="discrete", label_b="continuous"))
    for c in conds:
        claims.append(Claim(
            f"t4_augment_vs_copy_{c}", "roda", f"augmentation beats direct copy under {c} (Table 4)", "order",
            (_rk("Table 4", c, t4_names["ot_discrete_augment"]),), (_rk("Table 4", c, t4_names["ot_discrete_copy"]),),
            "04_table4", t4("ot_discrete_augment", c), t4("ot_discrete_copy", c), label_a="augment",
            label_b="copy"))
    for a, b, text in (("moment_matching", "kl", "moment matching beats KL alignment"),
                       ("ot_discrete", "moment_matching", "discrete OT beats moment matching"),
                       ("ot_discrete", "ot_hungarian", "discrete OT beats the Hungarian assignment"),
                       ("kl", "no_alignment", "KL alignment is worse than no alignment"),
                       ("ot_discrete_augment", "no_alignment", "full RoDA beats no alignment")):
        claims.append(Claim(
            f"t4_{a}_vs_{b}_mean", "roda", f"{text} (Table 4, mean over the four corruptions)", "order",
            tuple(_rk("Table 4", c, t4_names[a]) for c in conds), tuple(_rk("Table 4", c, t4_names[b]) for c in conds),
            "04_table4", t4(a, list(conds)), t4(b, list(conds)), label_a=t4_names[a], label_b=t4_names[b]))

    # Fig. 5a (share of anomalous patches assigned), in percent of the anomalous patches
    fig5a = {"none": "no augmentation", "copy": "direct copy", "flip_rot90": "data augmentation (RoDA)"}
    for a, b in (("flip_rot90", "none"), ("flip_rot90", "copy"), ("copy", "none")):
        claims.append(Claim(
            f"fig5a_{a}_vs_{b}", "roda",
            f"{fig5a[a]} assigns fewer anomalous patches than {fig5a[b]} (Fig. 5a)", "order",
            (_rk("Fig. 5a", "one batch (condition not stated)", fig5a[a], "share_assigned"),),
            (_rk("Fig. 5a", "one batch (condition not stated)", fig5a[b], "share_assigned"),),
            "04_fig5a", dict(augment=a), dict(augment=b), metric="share_assigned", label_a=a, label_b=b,
            paper_data="MVTec AD, one adaptation batch (class and corruption not stated)",
            note="share of anomalous target patches that receive an assignment, percent"))

    # Table 5
    claims.append(Claim(
        "t5_20pct_reaches_98pct", "roda", "20% adaptation data reaches >= 98% of the 100% upper bound (Table 5)",
        "ratio", (_rk("Table 5", "mean", "RoDA (adapt 20%)"),), (_rk("Table 5", "mean", "RoDA (adapt 100%)"),),
        "04_table5", dict(adapt_fraction=0.2, condition=list(conds)), dict(adapt_fraction=1.0, condition=list(conds)),
        label_a="20%", label_b="100%", expect=1, scale=0.98))
    claims.append(Claim(
        "t5_100pct_vs_20pct", "roda", "adapting on all target data beats 20% (Table 5 mean)", "order",
        (_rk("Table 5", "mean", "RoDA (adapt 100%)"),), (_rk("Table 5", "mean", "RoDA (adapt 20%)"),),
        "04_table5", dict(adapt_fraction=1.0, condition=list(conds)), dict(adapt_fraction=0.2, condition=list(conds)),
        label_a="100%", label_b="20%"))

    # Fig. 5b (severity), no numbers printed
    claims.append(Claim(
        "fig5b_gap_grows_with_severity", "roda",
        "RoDA's margin over PatchCore grows with Gaussian-noise severity (Fig. 5b)", "order", (), (), "04_fig5b",
        ((1, dict(method="roda", severity="max")), (-1, dict(method="patchcore", severity="max"))),
        ((1, dict(method="roda", severity="min")), (-1, dict(method="patchcore", severity="min"))),
        label_a="gap@max severity", label_b="gap@min severity", expect=1,
        figure_only="the text says the gap becomes more pronounced at higher noise levels"))
    claims.append(Claim(
        "fig5b_roda_vs_patchcore_max_severity", "roda",
        "RoDA beats PatchCore at the highest Gaussian-noise severity (Fig. 5b; Table 1 at severity 5)", "order",
        (_rk("Table 1", "gaussian_noise", "RoDA"),), (_rk("Table 1", "gaussian_noise", "PatchCore"),), "04_fig5b",
        dict(method="roda", severity="max"), dict(method="patchcore", severity="max"), label_a="RoDA",
        label_b="PatchCore"))

    # absolute values: only with WRN-50 on all 15 MVTec classes
    abs_common = dict(pool_tasks=True, data_tasks=MVTEC_TASKS)
    claims.append(Claim(
        "abs_patchcore_clean", "roda", "PatchCore clean image AUROC 98.81 (Table 1)", "absolute",
        (_rk("Table 1", "clean", "PatchCore"),), (), "02_patchcore", dict(condition="clean"), **abs_common))
    claims.append(Claim(
        "abs_patchcore_gaussian_noise", "roda", "PatchCore image AUROC under Gaussian noise 80.23 (Table 1)",
        "absolute", (_rk("Table 1", "gaussian_noise", "PatchCore"),), (), "02_patchcore",
        dict(condition="gaussian_noise", severity="max"), **abs_common))
    claims.append(Claim(
        "abs_roda_mean", "roda", "RoDA mean image AUROC over the four corruptions 91.34 (Table 1)", "absolute",
        (_rk("Table 1", "mean", "RoDA"),), (), "03_roda", sel("roda", list(conds)), **abs_common))
    return claims


# DPDL: our dataset name -> (paper dataset, category) for the rows that exist in the paper
DPDL_DATASETS = {"elpv": ("ELPV", None), "headct": ("HeadCT", None), "brainmri": ("BrainMRI", None),
                 "ksdd": ("SDD", None), **{t: ("MVTec", t.split("/", 1)[1]) for t in MVTEC_TASKS}}
DPDL_BASELINES = {"devnet": "DevNet", "dra": "DRA", "flos": "FLOS"}
_T1 = ("MVTec", "Optical", "SDD", "AITEX", "ELPV", "Mastcam", "Hyper-Kvasir", "BrainMRI", "HeadCT")
_T2 = (("MVTec", "carpet"), ("MVTec", "metal_nut"), ("AITEX", None), ("ELPV", None), ("Mastcam", None),
       ("Hyper-Kvasir", None))


DPDL_FILES = {"general": "05_general_runs", "hard": "05_hard_runs"}  # columns: task, setting, seen_class,
# n_anomalies, seed, method (dpdl/devnet/dra/flos), auroc; hard rows are averaged over seen classes per seed
ABLATION_FILE = "05_ablation_runs"  # method: DPDL, w/o DPL, w/o DFL, M_r, M_n + M_r, M_a + M_r (general, largest M)


def _dpdl_where(method, setting, m):
    return dict(method=method, setting=setting, n_anomalies="max" if m == 10 else 1)


def _dpdl_claims() -> list[Claim]:
    claims = []
    common = dict(paper_backbone="ResNet-18", metric="auroc")
    # across the paper's datasets, checked on every dataset we run
    for setting, table, rows in (("general", "Table 1", [(d, None) for d in _T1]), ("hard", "Table 2", list(_T2))):
        for m in (10, 1):
            ps = f"{setting} M={m}"
            for ours_b, name in DPDL_BASELINES.items():
                claims.append(Claim(
                    f"dpdl_vs_{ours_b}_{setting}_m{m}", "dpdl",
                    f"DPDL beats {name} in the {setting} setting, M={m} ({table}, all its datasets)", "order",
                    tuple(_rk(table, ps, "DPDL", dataset=d, category=c, paper="dpdl") for d, c in rows),
                    tuple(_rk(table, ps, name, dataset=d, category=c, paper="dpdl") for d, c in rows),
                    DPDL_FILES[setting], _dpdl_where("dpdl", setting, m), _dpdl_where(ours_b, setting, m),
                    label_a="DPDL", label_b=name, expect=1,
                    paper_data=f"{len(rows)} datasets of {table} (mean)",
                    note=f"paper M={m}; ours takes {'the largest M run' if m == 10 else 'M=1'}", **common))
    # per dataset, where we run the paper's dataset
    for ours_task, (dataset, category) in DPDL_DATASETS.items():
        settings = [("general", "Table 5" if category else "Table 1")]
        if (dataset, category) in _T2:
            settings.append(("hard", "Table 2"))
        for setting, table in settings:
            for m in (10, 1):
                ps = f"{setting} M={m}"
                where = dataset + (f"/{category}" if category else "")
                for ours_b, name in (("devnet", "DevNet"), ("dra", "DRA")):
                    claims.append(Claim(
                        f"dpdl_vs_{ours_b}_{setting}_m{m}_{slug(ours_task)}", "dpdl",
                        f"DPDL vs {name} on {where}, {setting} M={m} ({table})", "order",
                        (_rk(table, ps, "DPDL", dataset=dataset, category=category, paper="dpdl"),),
                        (_rk(table, ps, name, dataset=dataset, category=category, paper="dpdl"),),
                        DPDL_FILES[setting], _dpdl_where("dpdl", setting, m), _dpdl_where(ours_b, setting, m),
                        label_a="DPDL", label_b=name, tasks=(ours_task,), paper_data=where, **common))
                claims.append(Claim(
                    f"abs_dpdl_{setting}_m{m}_{slug(ours_task)}", "dpdl",
                    f"DPDL AUC on {where}, {setting} M={m} ({table})", "absolute",
                    (_rk(table, ps, "DPDL", dataset=dataset, category=category, paper="dpdl"),), (), DPDL_FILES[setting],
                    _dpdl_where("dpdl", setting, m), tasks=(ours_task,), paper_data=where,
                    paper_params={"n_anomalies": m}, **common))
    # Table 3 heads (general M=10; the paper's mean of AITEX / ELPV / Mastcam), on every dataset we run
    heads = {"M_r": "M_r only", "M_n + M_r": "M_n + M_r", "M_a + M_r": "M_a + M_r"}
    ds = ("AITEX", "ELPV", "Mastcam")
    for ours_variant, name in heads.items():
        claims.append(Claim(
            f"t3_full_vs_{slug(ours_variant)}", "dpdl", f"all three heads beat {name} (general M=10, Table 3)", "order",
            tuple(_rk("Table 3", "general M=10", "M_n + M_a + M_r (DPDL)", dataset=d, paper="dpdl") for d in ds),
            tuple(_rk("Table 3", "general M=10", name, dataset=d, paper="dpdl") for d in ds),
            ABLATION_FILE, dict(method="DPDL", n_anomalies="max"), dict(method=ours_variant, n_anomalies="max"),
            label_a="DPDL", label_b=name, paper_data="AITEX, ELPV, Mastcam (mean)", **common))
    for ours_variant in ("w/o DPL", "w/o DFL"):
        claims.append(Claim(
            f"fig2_full_vs_{slug(ours_variant)}", "dpdl", f"DPDL beats DPDL {ours_variant} (Fig. 2)", "order", (), (),
            ABLATION_FILE, dict(method="DPDL", n_anomalies="max"), dict(method=ours_variant, n_anomalies="max"),
            label_a="DPDL", label_b=ours_variant, expect=1,
            figure_only="removing either component gives a significant AUC decline", **common))
    return claims


RODA_CLAIMS: tuple[Claim, ...] = tuple(_roda_claims())
DPDL_CLAIMS: tuple[Claim, ...] = tuple(_dpdl_claims())
ALL_CLAIMS: tuple[Claim, ...] = RODA_CLAIMS + DPDL_CLAIMS
