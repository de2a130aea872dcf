"""The rule that chooses the recommended label-free RoDA configuration from a grid table (docs/recommendation.md).

The rule reads a table of runs (``results/real_full/08_roda_grid.csv``: one row per task, method, corruption,
seed, severity and corruption stage, with image and pixel AUROC) and ranks every candidate configuration against
the reference (PatchCore without adaptation). Evaluation labels enter only here, to score configurations on the
development categories; none enters a configuration itself (every candidate adapts on unlabeled images).

For a candidate ``m`` and a cell (task ``t``, corruption ``c``), the difference is paired by seed and then
averaged over the seeds::

    d_pixel(m, t, c) = mean_s [ pixel_AUROC(m, t, c, s) - pixel_AUROC(reference, t, c, s) ]

1. complete: ``m`` has a finite image and pixel AUROC for every (task, corruption, seed) of the development set;
2. eligible: the mean over cells of the image difference is >= 0 and the worst cell's pixel difference is >=
   ``worst_floor`` (-0.10: never ten points below PatchCore's pixel AUROC in any cell);
3. chosen: the eligible candidate with the largest mean pixel difference; candidates within ``tie`` (one point) of
   it are tied and the one with the larger worst-cell pixel difference wins; if no candidate is eligible, or the
   best mean pixel difference is not above 0, the reference itself (no adaptation) is recommended.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lib.common.corruptions import stage_of
from lib.common.registry import PAPER_CORRUPTIONS

#: the development categories: the real categories the repository has (further ones are held back to check)
DEV_TASKS = ("mvtec/screw", "mvtec/bottle", "mvtec/tire", "ksdd")


def rank_candidates(table: pd.DataFrame, reference: str = "patchcore", stage: str = "working", severity: int = 5,
                    tasks=DEV_TASKS, corruptions=PAPER_CORRUPTIONS, seeds=(0, 1, 2), worst_floor: float = -0.10,
                    tie: float = 0.01) -> pd.DataFrame:
    """One row per candidate method of ``table`` (rows of ``stage`` and ``severity`` only; a table without a
    ``stage`` column was measured at ``"working"``): cells, completeness, mean / worst paired differences against
    ``reference``, eligibility and the ``chosen`` flag (exactly one row, the reference's when none qualifies)."""
    t = table.assign(stage=stage_of(table))
    t = t[(t.stage == stage) & (t.severity == severity) & t.task.isin(tasks) & t.condition.isin(corruptions)
          & t.seed.isin(seeds)]
    keys = ["task", "condition", "seed"]
    metrics = ["image_auroc", "pixel_auroc"]
    need = len(tasks) * len(corruptions) * len(seeds)
    ref = t[t.method == reference].dropna(subset=metrics).groupby(keys)[metrics].mean()
    rows = [dict(method=reference, complete=len(ref) == need, cells=len(ref.groupby(level=[0, 1])),
                 image_mean_diff=0.0, pixel_mean_diff=0.0, pixel_worst_diff=0.0)]
    for method, g in t[t.method != reference].groupby("method", sort=True):
        runs = g.dropna(subset=metrics).groupby(keys)[metrics].mean()
        paired = runs.join(ref.add_suffix("_ref"), how="inner")
        cell = paired.groupby(["task", "condition"]).mean()
        d_pixel = cell["pixel_auroc"] - cell["pixel_auroc_ref"]
        d_image = cell["image_auroc"] - cell["image_auroc_ref"]
        rows.append(dict(method=method, complete=len(paired) == need, cells=len(cell),
                         image_mean_diff=float(d_image.mean()) if len(cell) else np.nan,
                         pixel_mean_diff=float(d_pixel.mean()) if len(cell) else np.nan,
                         pixel_worst_diff=float(d_pixel.min()) if len(cell) else np.nan))
    out = pd.DataFrame(rows)
    is_ref = out.method == reference
    out["eligible"] = (~is_ref & out.complete & (out.image_mean_diff >= 0)
                       & (out.pixel_worst_diff >= worst_floor))
    out["chosen"] = False
    pool = out[out.eligible]
    if len(pool) and pool.pixel_mean_diff.max() > 0 and bool(out.loc[is_ref, "complete"].all()):
        tied = pool[pool.pixel_mean_diff >= pool.pixel_mean_diff.max() - tie]
        out.loc[tied.pixel_worst_diff.idxmax(), "chosen"] = True
    else:
        out.loc[is_ref, "chosen"] = True
    out = out.assign(stage=stage, severity=severity, reference=reference)
    return out.sort_values(["chosen", "eligible", "pixel_mean_diff"], ascending=False, ignore_index=True)


def recommended(table: pd.DataFrame, **kwargs) -> str:
    """The method :func:`rank_candidates` chooses."""
    ranked = rank_candidates(table, **kwargs)
    return str(ranked.loc[ranked.chosen, "method"].iloc[0])
