"""Image and pixel AUROC (scikit-learn), anomalies as the positive class, and mean +- std tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def image_auroc(labels, scores) -> float:
    """AUROC of image scores; NaN when only one class is present (and so no AUROC exists)."""
    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf: the model diverged (lower the learning rate) or features are NaN")
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def shortcut_auroc(labels, statistic) -> float:
    """How well a label-blind image statistic (mean grey level, contrast, ...) separates anomalous from
    normal images: the image AUROC of the statistic used as a score, folded to [0.5, 1] since either
    direction is a shortcut. Near 1, a model that merely tracks the statistic reaches an image AUROC near
    1 *or near 0*, which then says little about defects (MVTec screw's test split is such a case for the
    mean grey level, notebook 01)."""
    auc = image_auroc(labels, statistic)
    return max(auc, 1.0 - auc)


def pixel_auroc(masks, maps, max_pixels: int | None = 4_000_000, seed: int = 0) -> float:
    """Pixel AUROC over all images ("full pixel AUROC" of the official PatchCore evaluation).

    With more than ``max_pixels`` pixels a seeded uniform subsample of pixels is scored (the AUROC
    estimate is unbiased; its standard error is far below a tenth of a point at 4M pixels).
    """
    masks = np.asarray(masks).astype(bool).ravel()
    maps = np.asarray(maps, dtype=np.float32).ravel()
    if masks.shape != maps.shape:
        raise ValueError(f"masks ({masks.size} px) and anomaly maps ({maps.size} px) differ in size")
    if not masks.any() or masks.all():
        return float("nan")
    if max_pixels and masks.size > max_pixels:
        idx = np.random.default_rng(seed).choice(masks.size, size=max_pixels, replace=False)
        masks, maps = masks[idx], maps[idx]
    return float(roc_auc_score(masks, maps))


def mean_std(df: pd.DataFrame, by, value: str = "value", scale: float = 100.0, digits: int = 1) -> pd.DataFrame:
    """Aggregate seeds: mean, std and count of ``value`` per group, plus a ``mean ± std`` text column."""
    g = df.groupby(by, sort=False)[value]
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    out["text"] = [
        f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if n > 1 else f"{m * scale:.{digits}f}"
        for m, s, n in zip(out["mean"], out["std"], out["count"])
    ]
    return out
