"""RoDA Table 1 / Table 3 in the paper's layout and the decomposition of RoDA's parts, from a grid table, per
corruption stage (lib.reporting.protocol_tables), with the paper's numbers beside ours where the paper has the row
(Table 1 / 3 over the MVTec categories where the paper-literal RoDA ran at that stage, so every method's row
averages the same categories; KolektorSDD has no row in the paper's tables);
at severity 5 also the recommendation rule applied to each stage's rows (lib.reporting.recommendation,
docs/recommendation.md: ``recommendation_working.csv`` chose, ``recommendation_native.csv`` checks).

    python scripts/protocol_tables.py                      # results/real_full/08_roda_grid.csv -> 08_table1.csv,
                                                           # 08_table3.csv, 08_decomposition.csv beside it
    python scripts/protocol_tables.py --grid G.csv --severity 3

Where the ablation rows ran (``run_roda_grid.py --methods t4_kl,t4_moment_matching,...``: ``registry.TABLE4_ROWS``, the
``TABLE4_VARIANTS`` of lib/experiments/profiles.py): Table 4 in the same layout on the (category, seed)s every row
ran (``08_table4.csv``, :func:`lib.reporting.protocol_tables.table4_layout`).

Where Gaussian noise ran at several severities (``run_roda_grid.py --severity K --corruptions gaussian_noise``):
Fig. 5b, PatchCore and the literal RoDA per severity on the same categories (``08_fig5b.csv``,
:func:`lib.reporting.protocol_tables.severity_curve`).

With ``--backbones`` (default: ``08_roda_backbones.csv`` beside the grid, where it exists: the same grid run with
another encoder, ``scripts/run_roda_grid.py --backbone``): each method's effect over PatchCore, and over BatchNorm
statistics alone (``reference`` column), per backbone on the cells both encoders ran, and the difference between
the encoders (``08_backbones.csv``, :func:`lib.reporting.protocol_tables.backbone_effects`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common.corruptions import stage_of
from lib.common.registry import TABLE4_ABLATION
from lib.common.utils import REPO_ROOT, write_csv
from lib.reporting.protocol_tables import (
    backbone_effects,
    decomposition,
    paper_layout,
    severity_curve,
    table4_layout,
)
from lib.reporting.recommendation import rank_candidates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=str(REPO_ROOT / "results" / "real_full" / "08_roda_grid.csv"))
    p.add_argument("--paper", default=str(REPO_ROOT / "references" / "paper_numbers.csv"))
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--out-dir", default=None, help="default: the grid table's folder")
    p.add_argument("--backbones", default=None,
                   help="the grid run with another encoder (default: 08_roda_backbones.csv beside --grid, if any)")
    args = p.parse_args(argv)
    grid, paper = pd.read_csv(args.grid), pd.read_csv(args.paper)
    stage_of_row = stage_of(grid)
    stages = sorted(set(stage_of_row))
    out = Path(args.out_dir or Path(args.grid).parent)
    suffix = "" if args.severity == 5 else f"_severity{args.severity}"
    # every row of a stage averages the same categories: the MVTec-layout ones (MVTec AD, MVTec 3D-AD tire; the
    # paper's tables are MVTec's, KolektorSDD has no row in them) where the paper-literal RoDA ran at that stage
    ran = grid.method.eq("roda") & grid.task.str.startswith("mvtec/")
    tasks = {s: sorted(set(grid.task[(stage_of_row == s) & ran])) or None for s in stages}
    for metric, name in (("image_auroc", "08_table1"), ("pixel_auroc", "08_table3")):
        tables = [paper_layout(grid[~grid.method.isin(TABLE4_ABLATION)], paper, metric, stage=s,
                               severity=args.severity, tasks=tasks[s]) for s in stages]
        print(write_csv(pd.concat(tables, ignore_index=True), out / f"{name}{suffix}.csv"))
    # Table 4 where its ablation-only rows (registry.TABLE4_ABLATION) ran, both metrics in one file
    if grid.method.isin(TABLE4_ABLATION).any():
        table4 = [table4_layout(grid, paper, m, stage=s, severity=args.severity, tasks=tasks[s])
                  for s in stages for m in ("image_auroc", "pixel_auroc")]
        print(write_csv(pd.concat(table4, ignore_index=True), out / f"08_table4{suffix}.csv"))
    # the chain on the same categories as the tables (its steps beyond BatchNorm statistics run on MVTec only)
    parts = [decomposition(grid, stage=s, severity=args.severity, tasks=tasks[s]) for s in stages]
    print(write_csv(pd.concat(parts, ignore_index=True), out / f"08_decomposition{suffix}.csv"))
    # Fig. 5b where a stage ran Gaussian noise at more than one severity (every severity: written once, with the
    # severity-5 tables)
    curves = [severity_curve(grid, stage=s, tasks=tasks[s]) for s in stages if args.severity == 5
              and grid.severity[(stage_of_row == s) & grid.condition.eq("gaussian_noise")].nunique() > 1]
    if curves:
        print(write_csv(pd.concat(curves, ignore_index=True), out / "08_fig5b.csv"))
    other = Path(args.backbones) if args.backbones else Path(args.grid).with_name("08_roda_backbones.csv")
    if other.is_file() or args.backbones:
        extra = pd.read_csv(other)
        both = pd.concat([grid, extra], ignore_index=True)
        base = grid.backbone.mode().iat[0]  # the main grid's encoder: the others are read against it
        # over PatchCore, and over BatchNorm statistics alone (what the alignment adds to them, per encoder)
        parts = [backbone_effects(both, stage=s, severity=args.severity, reference=ref, base=base)
                 for s in sorted(set(stage_of(extra))) for ref in ("patchcore", "adabn_matched")]
        print(write_csv(pd.concat(parts, ignore_index=True), out / f"08_backbones{suffix}.csv"))
    if args.severity == 5:
        for stage in stages:
            print(write_csv(rank_candidates(grid, stage=stage), out / f"recommendation_{stage}.csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
