"""Our result tables and the paper's numbers, as the verdicts read them, and the command that writes each table.

:func:`load_reference` reads ``references/paper_numbers.csv`` (the paper's numbers, never ours);
:func:`load_results` reads a profile's result tables (:data:`RESULT_FILES`) and lays the RoDA grid out as
notebook 04's Table 4 and Fig. 5b tables (:data:`GRID_VIEWS`, :func:`lib.reporting.protocol_tables.grid_views`),
which the claims of those figures read first. :data:`COMMANDS` / :data:`NOTEBOOK_COMMAND`: how to produce a table
a claim found missing (:func:`lib.reporting.fidelity.produce_command` fills them in).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lib.common.registry import TABLE4_ROWS
from lib.common.utils import REPO_ROOT
from lib.reporting.protocol_tables import FIG5B_METHODS, GRID_FIG5B, GRID_TABLE4, grid_views

REFERENCE_CSV = REPO_ROOT / "references" / "paper_numbers.csv"
REFERENCE_COLUMNS = ("key", "paper", "source", "table", "dataset", "category", "setting", "method", "metric",
                     "value", "std", "printed", "backbone", "note")
RESULT_FILES = ("01_shortcut", "02_patchcore", "03_roda", "04_table4", "04_table5", "04_fig5a", "04_fig5b",
                "05_general_runs", "05_hard_runs", "05_ablation_runs", "08_roda_grid", "08_roda_runs")
#: views of ``08_roda_grid`` in the layout of notebook 04's Table 4 and Fig. 5b tables
#: (:func:`lib.reporting.protocol_tables.grid_views`), read before those files where the grid ran the rows
GRID_VIEWS = (GRID_TABLE4, GRID_FIG5B)
#: the command that writes each table (``{profile}``, ``{stage}``, ``{tasks}``, ``{methods}`` filled in); the grid
#: job writes its own file, folded into the grid table after it (scripts/run_roda_grid.py --merge)
_GRID_RUN = ("OMP_NUM_THREADS=2 python scripts/run_roda_grid.py --profile {profile} --stage {stage} --tasks {tasks} "
             "--seeds 0,1,2")
_GRID_MERGE = " && python scripts/run_roda_grid.py --out results/{profile}/08_roda_grid.csv --merge "
COMMANDS = {
    "08_roda_grid": _GRID_RUN + " --methods {methods} --threads 2 --out runs/roda_{stage}.csv" + _GRID_MERGE
                    + "runs/roda_{stage}.csv",
    GRID_TABLE4: _GRID_RUN + f" --methods {','.join(grid for _, grid in TABLE4_ROWS.values())}"
                 + " --threads 2 --out runs/roda_{stage}_table4.csv" + _GRID_MERGE + "runs/roda_{stage}_table4.csv",
    GRID_FIG5B: "for k in 1 2 3 4 5; do " + _GRID_RUN + f" --methods {','.join(FIG5B_METHODS)}"
                " --corruptions gaussian_noise --severity $k --threads 2 --out runs/roda_{stage}_noise$k.csv; done"
                + _GRID_MERGE + "runs/roda_{stage}_noise*.csv",
}
NOTEBOOK_COMMAND = "python scripts/run_notebooks.py --profile {profile} --only {notebook}"


def load_reference(path=None) -> pd.DataFrame:
    """``references/paper_numbers.csv`` as a DataFrame (values in percent)."""
    df = pd.read_csv(path or REFERENCE_CSV, dtype={"category": str})
    missing = set(REFERENCE_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"{path or REFERENCE_CSV} lacks columns {sorted(missing)}")
    return df


def load_results(results_dir) -> dict:
    """Our result tables in ``results_dir``: stem -> DataFrame, or None where the file is missing; with the
    :data:`GRID_VIEWS` of the RoDA grid where it exists."""
    results_dir = Path(results_dir)
    results = {stem: (pd.read_csv(results_dir / f"{stem}.csv") if (results_dir / f"{stem}.csv").exists() else None)
               for stem in RESULT_FILES}
    grid = results["08_roda_grid"]
    return results | (grid_views(grid) if grid is not None else dict.fromkeys(GRID_VIEWS))
