"""The verdict tables of a profile: every claim of both papers against the profile's current result tables.

:func:`write_verdicts` is what notebook 06 runs and ``scripts/fidelity_tables.py`` runs after a long grid has
landed: one table per corruption stage (:mod:`lib.reporting.fidelity`; the paper's protocol, ``native``, reads
every claim of both papers, the harsher ``working`` stage RoDA's claims only, never mixed), written to
``06_fidelity.csv`` / ``06_fidelity_working.csv`` in the profile's results folder, and one forest plot per paper
and stage in its figures folder (paper effect vs ours, with intervals).
"""

from __future__ import annotations

import pandas as pd

from lib.common.utils import save_figure, write_csv
from lib.reporting import fidelity, figures

#: (stage, claims, table name) of every verdict table
STAGE_TABLES = ((fidelity.PAPER_STAGE, fidelity.ALL_CLAIMS, "06_fidelity"),
                ("working", fidelity.RODA_CLAIMS, "06_fidelity_working"))
PAPER_BACKBONES = {"roda": "WRN-50, MVTec mean", "dpdl": "ResNet-18, its datasets"}


def verdict_tables(cfg, dpdl_tasks=None, results: dict | None = None, reference: pd.DataFrame | None = None) -> dict:
    """``{stage: table}`` of the profile ``cfg`` (its results folder unless ``results`` is given); ``dpdl_tasks``:
    the DPDL tasks notebook 05 ran when they differ from the profile's."""
    results = fidelity.load_results(cfg.results_dir) if results is None else results
    reference = fidelity.load_reference() if reference is None else reference
    context = fidelity.profile_context(cfg, dpdl_tasks=dpdl_tasks)
    tables = {}
    for stage, claims, _ in STAGE_TABLES:
        table = fidelity.fidelity_table(claims, reference, results, context=context, stage=stage)
        table.insert(0, "profile", cfg.name)
        tables[stage] = table
    return tables


def forest_figures(cfg, tables: dict) -> list:
    """One forest plot per paper and stage (claims with our effect only), saved in the profile's figures folder;
    the figures (for a notebook to show; a script closes them)."""
    written = []
    for stage, table in tables.items():
        for paper, rows in table[table.kind != "absolute"].groupby("paper"):
            if rows.ours_effect.isna().all():
                continue
            name = f"06_fidelity_forest_{paper}" + ("" if stage == fidelity.PAPER_STAGE else f"_{stage}")
            title = f"{paper.upper()}: paper vs. ours ({cfg.backbone}"
            title += f", RoDA at the {stage} stage)" if paper == "roda" else ")"
            fig = figures.forest(rows, paper_label=f"paper ({PAPER_BACKBONES.get(paper, 'its backbone')})",
                                 title=title)
            save_figure(fig, f"{cfg.figures_dir}/{name}.png")
            written.append(fig)
    return written


def write_verdicts(cfg, dpdl_tasks=None, plots: bool = True) -> dict:
    """:func:`verdict_tables` written (atomically) to the profile's results folder, with the forest plots."""
    tables = verdict_tables(cfg, dpdl_tasks=dpdl_tasks)
    for stage, _, name in STAGE_TABLES:
        write_csv(tables[stage], f"{cfg.results_dir}/{name}.csv")
    if plots:
        forest_figures(cfg, tables)
    return tables
