"""Plotting helpers shared by the notebooks (matplotlib + seaborn). Each returns a Figure; the
notebook saves it with :func:`lib.common.utils.save_figure`. Paper numbers are drawn only by :func:`forest`,
marked and labelled as the paper's."""

from __future__ import annotations

from pathlib import Path

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
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
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


# ----------------------------------------------------------------------------------------------------
# Notebook 06 helpers (qualitative maps, faceted bars, paper-vs-ours gaps)
# ----------------------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def map_grid(images, maps, masks=None, row_titles=None, map_titles=None, scores=None, cell: float = 2.1,
             alpha: float = 0.5, cmap: str = "jet"):
    """RoDA Fig. 4 layout: per row the input image, then each anomaly map overlaid on it, then the mask.

    ``images``: list of HxWx3 arrays in [0, 1]; ``maps``: list (rows) of lists (columns) of HxW maps, each
    min-max normalised on its own; ``masks``: list of HxW bool arrays or None (no ground-truth column when
    all are None); ``scores``: optional rows x columns image scores written into the panels."""
    has_gt = masks is not None and any(m is not None for m in masks)
    n_maps = len(maps[0])
    cols = 1 + n_maps + int(has_gt)
    fig, axes = plt.subplots(len(images), cols, figsize=(cell * cols, cell * len(images)), squeeze=False)
    titles = ["input", *(map_titles or [f"map {i}" for i in range(n_maps)])] + (["ground truth"] if has_gt else [])
    for r, img in enumerate(images):
        row = axes[r]
        row[0].imshow(np.clip(img, 0, 1))
        for c in range(n_maps):
            row[1 + c].imshow(np.clip(img, 0, 1))
            row[1 + c].imshow(_unit(maps[r][c]), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            if scores is not None and scores[r][c] is not None:
                row[1 + c].text(0.02, 0.03, f"s={scores[r][c]:.2f}", transform=row[1 + c].transAxes, fontsize=7,
                                color="white", bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0))
        if has_gt:
            mask = masks[r]
            row[-1].imshow(mask if mask is not None else np.zeros(img.shape[:2]), cmap="gray", vmin=0, vmax=1)
        for c, ax in enumerate(row):
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        if row_titles:
            row[0].set_ylabel(row_titles[r], fontsize=8)
    fig.tight_layout()
    return fig


def facet_bars(df: pd.DataFrame, x: str, y: str, hue: str | None = None, col: str | None = None, title: str = "",
               percent: bool = True, ylim=None, col_wrap: int = 3, height: float = 3.2):
    """Bars of ``y`` (mean, error bar = std over repeated rows such as seeds), one panel per ``col``."""
    data = df.copy()
    if percent:
        data[y] = data[y] * 100
    kw = dict(col=col, col_wrap=min(col_wrap, data[col].nunique()) if col else None)
    grid = sns.catplot(data=data, x=x, y=y, hue=hue, kind="bar", errorbar="sd", height=height,
                       aspect=1.5, sharey=True, **{k: v for k, v in kw.items() if v is not None})
    for ax in grid.axes.flat:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        if ylim is not None:
            ax.set_ylim(*ylim)
        if percent:
            ax.axhline(50, color="gray", lw=0.8, ls=":")
    if col:
        grid.set_titles("{col_name}")
    grid.set_axis_labels("", y.replace("_", " ") + (" (%)" if percent else ""))
    if title:
        grid.figure.suptitle(title, y=1.02)
    return grid.figure


#: verdict -> colour of our interval in :func:`forest`
VERDICT_COLOURS = {"reproduced in size": "tab:green", "reproduced": "tab:olive", "contradicted": "tab:red",
                   "not reproduced": "tab:orange", "inconclusive": "tab:gray", "not testable": "lightgray"}


def forest(table: pd.DataFrame, paper_label: str = "paper (its backbone and data)", title: str = ""):
    """One line per claim of a fidelity table (:func:`lib.reporting.fidelity.fidelity_table`): our effect with its
    interval (``ours_effect``, ``ci_low``, ``ci_high``), coloured by verdict, hollow where the row is not counted,
    and the paper's effect (``paper_effect``) as a black cross labelled ``paper_label``, so it is never read as
    ours. Rows without our effect are left out."""
    data = table[table.ours_effect.notna()].reset_index(drop=True)
    y = np.arange(len(data))
    fig, ax = plt.subplots(figsize=(8.5, 0.28 * len(data) + 1.4))
    for i, row in data.iterrows():
        colour = VERDICT_COLOURS.get(row.verdict, "black")
        if pd.notna(row.ci_low):
            ax.plot([row.ci_low, row.ci_high], [i, i], color=colour, lw=1.6)
        ax.plot(row.ours_effect, i, "o", color=colour, mfc=colour if bool(row.counted) else "white", ms=5)
    paper = data.paper_effect.astype(float)
    ax.plot(paper, y, "x", color="black", ms=6, label=paper_label)
    for verdict_name, colour in VERDICT_COLOURS.items():
        if (data.verdict == verdict_name).any():
            ax.plot([], [], "o-", color=colour, label=f"ours: {verdict_name}")
    ax.plot([], [], "o", color="gray", mfc="white", label="ours, not counted")
    labels = data.claim_id + np.where(data.counted.astype(bool), "", " · " + data.tasks.astype(str))
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("effect A - B (points), 95% interval over categories x seeds")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title)
    fig.tight_layout()
    return fig


def recorded(path, index, columns: str, values: str, query: str | None = None, scale: float = 100.0,
             decimals: int = 1) -> pd.DataFrame:
    """A recorded results CSV as the table the notebook text talks about: ``values`` (x ``scale``, rounded)
    by ``index`` and ``columns``, averaged over any other column (e.g. seeds), after ``query`` (pandas
    syntax). The numbers a "what we measured" cell discusses are read here, never typed into markdown; a
    missing file gives a one-row table that says so, so the notebook still runs on a fresh machine."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame({"note": [f"{path.name} not recorded yet (run the profile that writes it)"]})
    df = pd.read_csv(path)
    if query:
        df = df.query(query)
    table = df.pivot_table(index=index, columns=columns, values=values, aggfunc="mean") * scale
    return table.round(decimals)


def written_by_this_run(recorded_path, results_dir) -> bool:
    """True where ``recorded_path`` lies in this run's own results folder: a ``real_full`` run writes the
    very file its "what we measured" section reads, so that section must not label the run's fresh table
    as the recorded one (it points to the table above instead)."""
    return Path(recorded_path).resolve().parent == Path(results_dir).resolve()


def grid_bars(table: pd.DataFrame, metric: str, methods, reference: str = "patchcore", title: str = ""):
    """One panel per task x corruption, one bar per method (mean, error bar = std over seeds) of ``metric``
    from a RoDA grid table (``lib.experiments.roda_grid.run_grid``); ``reference``'s mean is the dashed line."""
    data = table[table.method.isin(methods)].copy()
    data["cell"] = data.task.str.replace("mvtec/", "", regex=False) + " · " + data.condition.map(pretty)
    data["method"] = pd.Categorical(data.method, [m for m in methods if m in set(data.method)])
    order = sorted(data.cell.unique())
    grid = sns.catplot(data=data.assign(**{metric: data[metric] * 100}), x="method", y=metric, col="cell",
                       col_order=order, col_wrap=4, kind="bar", errorbar="sd", height=2.6, aspect=1.25,
                       hue="method", dodge=False, legend=False, palette="tab10")
    for ax, cell in zip(grid.axes.flat, order):
        ref = data[(data.cell == cell) & (data.method == reference)][metric]
        if len(ref):
            ax.axhline(ref.mean() * 100, color="black", lw=0.8, ls="--")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.set_ylim(0, 100)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("", metric.replace("_auroc", " AUROC (%)"))
    if title:
        grid.figure.suptitle(title, y=1.01)
    return grid.figure


def epoch_curves(curves: pd.DataFrame, metric: str = "pixel_auroc", title: str = ""):
    """One panel per task x corruption: ``metric`` after every adaptation epoch, one line per method
    (:func:`lib.experiments.roda_grid.epoch_curve`; epoch 0 is the state the alignment starts from), PatchCore without
    adaptation as the dotted line, each method's stopping-rule epoch as a hollow marker."""
    data = curves.assign(cell=curves.task.str.replace("mvtec/", "", regex=False) + " · " + curves.condition.map(pretty))
    cells = sorted(data.cell.unique())
    ncol = min(4, len(cells))
    nrow = -(-len(cells) // ncol)
    colours = {m: f"C{i}" for i, m in enumerate(sorted(data.method.unique()))}
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.7 * nrow), squeeze=False, sharey=True)
    for ax, cell in zip(axes.flat, cells):
        part = data[data.cell == cell]
        for method, g in part.groupby("method", sort=True):
            g = g.groupby("epoch", as_index=False)[[metric, "stop_epoch"]].mean()
            ax.plot(g.epoch, g[metric] * 100, "o-", ms=3, color=colours[method])
            at = g[g.epoch == int(round(g.stop_epoch.iloc[0]))]
            ax.plot(at.epoch, at[metric] * 100, "o", ms=9, mfc="none", color=colours[method])
        ax.axhline(part[f"source_{metric}"].mean() * 100, color="black", lw=0.8, ls=":")
        ax.set_title(cell, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    for ax in axes.flat[len(cells):]:
        ax.axis("off")
    axes[0][0].set_ylabel(metric.replace("_auroc", " AUROC").replace("_", " ") + " (%)")
    handles = [plt.Line2D([], [], color=c, marker="o", ms=3, label=m) for m, c in colours.items()]
    handles.append(plt.Line2D([], [], color="black", lw=0.8, ls=":", label="PatchCore, no adaptation"))
    axes[0][0].legend(handles=handles, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
