"""Papermill smoke run of every numbered notebook on the ``smoke`` profile (generated data, seconds each).

All notebooks share one output folder, in order, as the main job runs them (later notebooks reuse the
cached memory banks and read the tables of earlier ones)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import run_notebooks  # noqa: E402

NOTEBOOKS = run_notebooks.notebooks()


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")


def test_every_notebook_is_numbered_and_has_a_parameters_cell():
    import nbformat

    assert [p.name[:2] for p in NOTEBOOKS] == sorted(p.name[:2] for p in NOTEBOOKS)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        for name in ("profile", "data_root", "categories", "device", "seed", "out_dir"):
            assert f"{name} =" in tagged[0].source, f"{path.name}: parameter {name} missing"
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name}: clear outputs"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_smoke_run(path, out_dir):
    out = out_dir / "runs" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    run_notebooks.run_one(path, out, dict(profile="smoke", out_dir=str(out_dir), device="cpu", seed=None,
                                          data_root=None, categories=None), timeout=600)
    assert out.exists()
    produced = list((out_dir / "figures" / "smoke").glob(f"{path.name[:2]}_*.png")) + \
        list((out_dir / "results" / "smoke").glob(f"{path.name[:2]}_*.csv"))
    assert produced, f"{path.name} wrote no figure or table"


@pytest.mark.notebook
def test_smoke_tables_match_the_golden_record(out_dir):
    """The smoke run above reproduces the recorded tables (tests/golden/smoke, scripts/smoke_golden.py): same
    tables, columns, rows and labels, numbers within a relative 1e-3 (thread count and CPU reorder
    floating-point sums). A refactor that moves a result fails here; an intended change refreshes the record
    with ``python scripts/smoke_golden.py --update`` in the same commit."""
    import smoke_golden

    if not all((out_dir / "runs" / p.name).exists() for p in NOTEBOOKS):
        pytest.skip("needs the smoke run of every notebook (run the whole file)")
    rows = smoke_golden.check(out_dir / "results" / "smoke")
    bad = [r for r in rows if r[1] not in ("identical", "within tolerance")]
    assert len(rows) >= 30 and not bad, f"tables that moved: {bad} (if intended: scripts/smoke_golden.py --update)"


def test_golden_comparison_tells_noise_from_a_moved_result(tmp_path):
    import smoke_golden

    def table(name, auroc, method="roda", seconds=1.0):
        path = tmp_path / name
        path.write_text(f"method,pixel_auroc,adapt_seconds\n{method},{auroc!r},{seconds}\n")
        return path

    gold = table("gold.csv", 0.8123456)
    assert smoke_golden.compare(table("same.csv", 0.8123456), gold)[0] == "identical"
    assert smoke_golden.compare(table("noise.csv", 0.8123460, seconds=9.0), gold)[0] == "within tolerance"
    assert smoke_golden.compare(table("moved.csv", 0.8223456), gold)[0] == "different"
    assert smoke_golden.compare(table("renamed.csv", 0.8123456, method="roda_v2"), gold)[0] == "different"
