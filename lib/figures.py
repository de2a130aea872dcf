"""Plotting helpers shared by the notebooks (matplotlib + seaborn). Each returns a Figure; the
notebook saves it with :func:`lib.utils.save_figure`. Paper numbers are never drawn here."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

sns.set_theme(context="notebook", style="whitegrid")

LABELS = {
    "clean": "clean",
    "gaussian_noise": "Gauss. noise",
    "defocus_blur": "defocus blur",
    "brightness": "brightness",
    "contrast": "contrast",
}


def pretty(name: str) -> str:
    return LABELS.get(name, name.replace("_", " "))


def image_grid(images, row_titles=None, col_titles=None, masks=None, cell: float = 2.0, cmap=None):
    """A rows x cols grid of images (list of lists of HxW[x3] arrays); optional mask contours."""
    rows, cols = len(images), len(images[0])
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            img = images[r][c]
            ax.imshow(img, cmap=cmap if np.ndim(img) == 2 else None)
            if masks is not None and masks[r][c] is not None and np.any(masks[r][c]):
                ax.contour(masks[r][c], levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0 and col_titles:
                ax.set_title(col_titles[c], fontsize=10)
            if c == 0 and row_titles:
                ax.set_ylabel(row_titles[r], fontsize=9)
    fig.tight_layout()
    return fig


def auroc_bars(df: pd.DataFrame, x: str, y: str, hue: str | None = None, title: str = "", ylim=(0.0, 1.0),
               err: str | None = None):
    """Grouped bar chart of AUROCs (values in [0, 1] shown in %)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * df[x].nunique() * (df[hue].nunique() if hue else 1) ** 0.5), 3.6))
    data = df.copy()
    data[y] = data[y] * 100
    sns.barplot(data=data, x=x, y=y, hue=hue, ax=ax, errorbar=("sd" if err else None))
    ax.set_ylim(ylim[0] * 100, ylim[1] * 100)
    ax.set_ylabel(y.replace("_", " ") + " (%)")
    ax.set_xlabel("")
    ax.axhline(50, color="gray", lw=0.8, ls=":")
    ax.set_title(title)
    if hue:
        ax.legend(fontsize=8, ncols=min(4, data[hue].nunique()), loc="lower left")
    fig.tight_layout()
    return fig


def lines(df: pd.DataFrame, x: str, y: str, hue: str, title: str = "", ylabel: str | None = None, percent=True):
    """Line plot with mean +- std bands over seeds (seaborn aggregates repeated x)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    data = df.copy()
    if percent:
        data[y] = data[y] * 100
    sns.lineplot(data=data, x=x, y=y, hue=hue, marker="o", errorbar="sd", ax=ax)
    ax.set_title(title)
    ax.set_ylabel(ylabel or y)
    fig.tight_layout()
    return fig
