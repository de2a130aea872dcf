"""Rewrite a profile's verdict tables and forest plots from its current result tables (notebook 06's part 3).

    PYTHONPATH=. python scripts/fidelity_tables.py --profile real_full

Run it after a long grid (``scripts/run_roda_grid.py``, ``scripts/run_dpdl.py --tables``) has folded new rows into
the profile's results: ``06_fidelity.csv`` (every claim, RoDA under the paper's protocol) and
``06_fidelity_working.csv`` (RoDA's claims at the working stage), with ``06_fidelity_forest_*.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import matplotlib  # noqa: E402

matplotlib.use("Agg")

from lib.experiments import profiles  # noqa: E402
from lib.reporting import fidelity, verdicts  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="real_full")
    ap.add_argument("--out-dir", default=None, help="the profile's results/figures root (default: the repository)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    cfg = profiles.get_profile(args.profile, out_dir=args.out_dir)
    tables = verdicts.write_verdicts(cfg, plots=not args.no_plots)
    for stage, _, name in verdicts.STAGE_TABLES:
        counts = fidelity.summary(tables[stage])
        print(f"{cfg.results_dir}/{name}.csv ({stage} stage, {len(tables[stage])} claims), counted rows per verdict:")
        print(counts.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
