"""lib.experiments.executor: a grid of cheap cells (no backbone), one of which dies on its first attempt.
The other cells
finish and keep their files; a rerun computes only the lost cell. Serially, on a local process pool and on a
local Ray instance."""

import json
import os
from pathlib import Path

import pytest

from lib.experiments.executor import cell_key, cell_path, collect, expand, run_cells, run_parallel

REPO = Path(__file__).resolve().parents[1]


def cheap_cell(cell):
    """A stand-in for a PatchCore/RoDA run: a known function of the cell. With ``crash_marker`` it dies the
    first time (the marker file records that it did), as a worker on a lost node would."""
    marker = cell.get("crash_marker")
    if marker and not os.path.exists(marker):
        Path(marker).write_text("died once")
        if cell.get("hard_crash"):
            os._exit(1)  # the whole worker process goes, no exception reaches anyone
        raise RuntimeError("planned failure of this cell")
    if cell.get("log"):  # one line per execution
        with open(cell["log"], "a") as fh:
            fh.write(f"{cell['seed']}\n")
    return {"auroc": cell["seed"] / 10 + cell["severity"] / 100, "pid": os.getpid()}


def _grid(tmp_path, hard_crash):
    cells = expand(task="elpv", corruption=["gaussian_noise", "contrast"], severity=[1, 5], seed=[0, 1],
                   method="patchcore")
    crash = dict(cells[5], crash_marker=str(tmp_path / "marker"), hard_crash=hard_crash)
    cells[5] = crash
    return cells, crash


def test_expand_and_keys_are_stable():
    cells = expand(seed=[0, 1], method=["a", "b"], task="t")
    assert cells[1] == {"seed": 0, "method": "b", "task": "t"} and len(cells) == 4
    # the key depends on the content only, not on the order of the fields
    assert cell_key({"a": 1, "b": "x"}) == cell_key({"b": "x", "a": 1})
    assert len(cell_key({"a": 1})) == 16 and cell_key({"a": 1}) != cell_key({"a": 2})
    with pytest.raises(ValueError, match="same cell twice"):
        run_parallel(cheap_cell, [{"seed": 0, "severity": 1}] * 2, "unused", backend="serial")
    with pytest.raises(TypeError, match="JSON"):
        run_parallel(cheap_cell, [{"seed": object()}], "unused", backend="serial")


def _check_first_run(first, cells, crash, tmp_path):
    lost = [c for c, _ in first.failed]
    assert lost == [crash] and len(first.ran) == len(cells) - 1 and not first.skipped
    assert not cell_path(tmp_path, crash).exists()  # no half-written file for the lost cell
    assert len(first.table) == len(cells) - 1 and len(list((tmp_path / "cells").iterdir())) == len(cells) - 1


def _check_second_run(second, cells, crash, tmp_path):
    # the rerun computes the lost cell only
    assert second.ran == [crash] and len(second.skipped) == len(cells) - 1 and second.complete
    table = second.table
    assert len(table) == len(cells) and list(table.columns[:5]) == ["task", "corruption", "severity", "seed", "method"]
    assert (table["auroc"] == table["seed"] / 10 + table["severity"] / 100).all()
    on_disk = collect(tmp_path)
    assert len(on_disk) == len(cells) and (tmp_path / "grid.csv").exists()
    record = json.loads(cell_path(tmp_path, crash).read_text())
    assert record["cell"] == crash
    assert record["metrics"]["auroc"] == pytest.approx(crash["seed"] / 10 + crash["severity"] / 100)


def test_serial_grid_survives_a_failing_cell_and_reruns_only_it(tmp_path):
    cells, crash = _grid(tmp_path, hard_crash=False)
    first = run_parallel(cheap_cell, cells, tmp_path, backend="serial")
    assert "planned failure" in first.failed[0][1]
    _check_first_run(first, cells, crash, tmp_path)
    second = run_parallel(cheap_cell, cells, tmp_path, backend="serial")
    _check_second_run(second, cells, crash, tmp_path)


def test_ray_grid_loses_only_the_killed_cell(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    # the local workers import lib.experiments.executor and this test module (cheap_cell) from the driver's environment
    paths = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs here; silences Ray's FutureWarning
    cells, crash = _grid(tmp_path, hard_crash=True)
    init = dict(num_cpus=2, object_store_memory=80 * 2**20)
    try:
        first = run_parallel(cheap_cell, cells, tmp_path, backend="ray", max_retries=0, init_kwargs=init)
        # the worker died: Ray reports a crashed worker for that cell and nothing else
        assert "Worker" in first.failed[0][1] or "died" in first.failed[0][1], first.failed
        _check_first_run(first, cells, crash, tmp_path)
        second = run_parallel(cheap_cell, cells, tmp_path, backend="ray", max_retries=0, init_kwargs=init)
    finally:
        ray.shutdown()
    _check_second_run(second, cells, crash, tmp_path)
    assert len(set(second.table["host"])) == 1  # one machine here; on a cluster, several


def test_process_pool_grid_uses_two_processes_and_reruns_only_the_failed_cell(tmp_path):
    cells, crash = _grid(tmp_path, hard_crash=False)
    first = run_parallel(cheap_cell, cells, tmp_path, backend="processes", workers=2)
    assert "planned failure" in first.failed[0][1]
    _check_first_run(first, cells, crash, tmp_path)
    assert os.getpid() not in set(first.table["pid"])  # the cells ran in the pool, not here
    second = run_parallel(cheap_cell, cells, tmp_path, backend="processes", workers=2)
    _check_second_run(second, cells, crash, tmp_path)
    with pytest.raises(ValueError, match="workers and threads"):
        run_parallel(cheap_cell, [{"seed": 9, "severity": 1}], tmp_path / "x", backend="processes", workers=0)


def test_run_cells_keeps_the_order_runs_duplicates_once_and_names_a_failure(tmp_path):
    log = tmp_path / "log"
    cells = [{"seed": s, "severity": 5, "log": str(log)} for s in (2, 0, 2, 1)]
    serial = run_cells(cheap_cell, cells)
    assert sorted(log.read_text().split()) == ["0", "1", "2"]  # the duplicate cell ran once
    log.unlink()
    pooled = run_cells(cheap_cell, cells, workers=2)
    assert sorted(log.read_text().split()) == ["0", "1", "2"]
    assert [r["auroc"] for r in pooled] == [r["auroc"] for r in serial] == pytest.approx([0.25, 0.05, 0.25, 0.15])
    assert os.getpid() not in {r["pid"] for r in pooled} and serial[0]["pid"] == os.getpid()
    bad = dict(seed=3, severity=5, crash_marker=str(tmp_path / "m"))
    with pytest.raises(RuntimeError, match="1 of 2 runs failed.*'seed': 3.*planned failure"):
        run_cells(cheap_cell, [cells[0], bad], workers=2)


def test_an_ablation_cell_runs_deterministic_kernels_from_its_own_seed(tmp_path):
    """A cell switches torch to its deterministic kernels (a worker or kernel that never seeded would sum the
    RoDA gradient with unordered atomic adds on 2+ threads) and gives the same metrics whatever the global
    generator's state before it."""
    import torch

    from lib.experiments import profiles
    from lib.experiments.roda_cells import ablation_cell

    cfg = profiles.get_profile("smoke", device="cpu", out_dir=tmp_path)
    cell = dict(task="synthetic", seed=1, corruption="gaussian_noise", severity=5, method="roda",
                fraction=cfg.corruption["adapt_fraction"], overrides={})
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        first = ablation_cell(cfg, cell)
        assert torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(False)
        torch.manual_seed(12345)
        torch.rand(1000)
        second = ablation_cell(cfg, cell)
    finally:
        torch.use_deterministic_algorithms(before, warn_only=True)
    first.pop("adapt_seconds"), second.pop("adapt_seconds")  # wall clock
    assert first == second and first["steps"] > 0
