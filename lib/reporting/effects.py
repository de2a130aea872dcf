"""The effect of a claim over category x seed cells: the two-stage bootstrap interval, Holm's correction and the
verdict (:mod:`lib.reporting.fidelity` applies them to the papers' claims; its docstring states the rules).

Our effect is the paper's class mean of paired differences d_cs (category c, seed s), in points::

    theta = 1/C sum_c dbar_c,    dbar_c = 1/n_c sum_s d_cs

Bootstrap (Davison & Hinkley 1997, Sec. 3.8, resampling both stages): draw C categories with replacement, then
within each drawn category its n_c cells with replacement; with one category only the seeds. The standard error
is the bootstrap's standard deviation times sqrt(k / (k - 1)), k the number of top-level units (categories where
there are two or more, else seeds); the interval is theta +- t_{k-1, 1-alpha/2} se, the p value of theta = 0 the
two-sided t(k - 1) one. Holm (1979): step-down adjustment of a family of p values, valid under any dependence.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
N_BOOTSTRAP = 10_000
BOOTSTRAP_SEED = 0


def category_mean(cells: pd.Series) -> float:
    """The mean over categories of the mean over their seeds (the paper's class mean)."""
    return float(cells.groupby(level="task").mean().mean()) if len(cells) else float("nan")


def effect_interval(cells: pd.Series, alpha: float = ALPHA, n_boot: int = N_BOOTSTRAP,
                    seed: int = BOOTSTRAP_SEED) -> dict:
    """theta (mean over categories of the mean over seeds), the two-stage bootstrap's standard error, the
    1 - alpha interval theta +- t_{k-1} se and the two-sided p of theta = 0 (module docstring).

    ``cells``: values indexed by (task, seed). k: the number of categories where there are two or more, else
    the number of seeds. k < 2: se, interval and p are NaN."""
    groups = [g.to_numpy(float) for _, g in cells.groupby(level="task")] if len(cells) else []
    est = float(np.mean([g.mean() for g in groups])) if groups else float("nan")
    n_cat = len(groups)
    k = n_cat if n_cat >= 2 else (groups[0].size if groups else 0)
    out = dict(estimate=est, se=float("nan"), low=float("nan"), high=float("nan"), p=float("nan"), k=k,
               n_categories=n_cat, n_cells=int(sum(g.size for g in groups)))
    if k < 2:
        return out
    rng = np.random.default_rng(seed)
    # within: for every category, n_boot x n_cat slots of seed-resampled means; between: which category fills
    # each slot (with one category the slot is always it, and only the seeds are resampled)
    within = np.stack([g[rng.integers(0, g.size, (n_boot, n_cat, g.size))].mean(axis=2) for g in groups])
    if n_cat >= 2:
        pick = rng.integers(0, n_cat, (n_boot, n_cat))
        theta = within[pick, np.arange(n_boot)[:, None], np.arange(n_cat)[None, :]].mean(axis=1)
    else:
        theta = within[0, :, 0]
    se = float(theta.std(ddof=1) * math.sqrt(k / (k - 1)))
    half = stats.t.ppf(1 - alpha / 2, k - 1) * se
    p = (2 * stats.t.sf(abs(est) / se, k - 1)) if se > 0 else (1.0 if est == 0 else 0.0)
    return dict(out, se=se, low=est - half, high=est + half, p=float(p))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment: sorted ascending, p_(i) -> max_{j <= i} min(1, (m - j + 1) p_(j)); NaN stays
    NaN and does not count in m."""
    p = np.asarray(p_values, float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = order.size
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out


def verdict(estimate: float, low: float, high: float, p_holm: float, paper_effect: float | None = None,
            expect: int | None = None, alpha: float = ALPHA) -> tuple[str, str]:
    """(verdict, why) of a tested pairwise claim (the rules: :mod:`lib.reporting.fidelity`). ``expect``: the
    paper's direction (+1 / -1; None: the sign of ``paper_effect``)."""
    if expect is None:
        expect = int(np.sign(paper_effect)) if paper_effect is not None and not math.isnan(paper_effect) else 0
    if not expect:
        return "not comparable", "the paper gives no direction for this claim"
    sized = paper_effect is not None and not math.isnan(paper_effect)
    inside = sized and low <= paper_effect <= high
    short = sized and max(expect * low, expect * high) < expect * paper_effect  # all of it short of the paper's
    where = ("the paper's effect inside our interval" if inside else
             "our interval short of the paper's effect" if short else
             "our interval beyond the paper's effect" if sized else "the paper gives no size")
    if p_holm < alpha:
        if np.sign(estimate) == expect:
            return ("reproduced in size" if inside else "reproduced"), f"significant in the paper's direction; {where}"
        return "contradicted", "significant in the direction opposite to the paper's"
    if short:
        return "not reproduced", f"not significant after Holm; {where}"
    return "inconclusive", f"not significant after Holm; {where}"
