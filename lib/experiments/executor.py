"""A grid of independent runs (task x corruption x severity x seed x method), one result file per cell.

A *cell* is a small dict of plain values, e.g. ``{"task": "mvtec/screw", "corruption": "gaussian_noise",
"severity": 5, "seed": 0, "method": "patchcore"}``; a *cell function* takes that dict and returns a dict of
metrics (plain numbers or strings). Both pickle, so a cell can run in another process or on another machine.

:func:`run_grid` runs every cell that has no result file yet:

* ``backend="ray"`` dispatches the cells as Ray tasks: a local Ray instance by default, or the cluster at
  ``address`` (``"auto"`` inside a cluster, ``"ray://head:10001"`` from outside);
* ``backend="processes"`` runs them on ``workers`` local processes (``threads`` torch threads each): both
  cores of a small machine without Ray, e.g. notebook 04's ablation runs on the ``real`` profile (a worker
  that dies, rather than a cell that raises, breaks the pool: the unfinished cells are reported failed);
* ``backend="serial"`` runs them one after the other in this process (also what ``"auto"`` falls back to
  when Ray is not installed).

Every finished cell writes ``<out_dir>/cells/<key>.json`` atomically (a temporary file renamed into place), where
``key`` is a hash of the cell dict. So a rerun skips finished cells, a killed worker or node loses only the cell it
was running, and nothing half-written is ever read. The worker writes the file where it runs and returns the
record, which the driver writes too when it cannot see the worker's file, so a cluster needs no shared disk.
:func:`collect` merges the cell files into one table (one row per cell: the cell's fields, then its metrics),
the layout the notebooks' result CSVs use.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# no torch/pandas at import: a worker that runs a cheap cell starts in a fraction of a second

CELL_FORMAT = "grid-cell/1"


def expand(**axes) -> list[dict]:
    """Every combination of the axes' values, in order: ``expand(seed=[0, 1], method=["a", "b"])`` gives
    ``[{"seed": 0, "method": "a"}, {"seed": 0, "method": "b"}, {"seed": 1, ...}, ...]``. A scalar is one value."""
    names = list(axes)
    values = [v if isinstance(v, (list, tuple)) else [v] for v in axes.values()]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def cell_key(cell: dict) -> str:
    """Stable 16-hex-digit name of a cell: the same in every process, on every machine."""
    text = json.dumps(cell, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _write_json_atomic(obj, path: Path) -> None:
    """``lib.common.utils.write_json`` without importing torch into every worker: temporary file, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cell_path(out_dir, cell: dict) -> Path:
    return Path(out_dir) / "cells" / f"{cell_key(cell)}.json"


def _check_cell(cell) -> dict:
    if not isinstance(cell, dict):
        raise TypeError(f"a grid cell must be a dict of plain values, got {type(cell).__name__}")
    try:
        json.dumps(cell)
    except TypeError as exc:
        raise TypeError(f"grid cell {cell!r} holds a value JSON cannot write ({exc}): use numbers, strings, "
                        "lists") from None
    return cell


def run_cell(fn: Callable[[dict], dict], cell: dict, out_dir) -> dict:
    """Run one cell unless its result file exists; write the record atomically; return the record.

    This is what a worker executes. The record holds the cell, its metrics, the seconds taken and the host.
    """
    path = cell_path(out_dir, cell)
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    metrics = fn(dict(cell))
    if not isinstance(metrics, dict):
        raise TypeError(f"cell function {getattr(fn, '__name__', fn)!r} returned {type(metrics).__name__}; "
                        "it must return a dict of metrics")
    record = dict(format=CELL_FORMAT, key=cell_key(cell), cell=cell, fields=list(cell), metrics=metrics,
                  metric_names=list(metrics),
                  seconds=time.perf_counter() - t0, host=socket.gethostname(), pid=os.getpid(),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_json_atomic(record, path)
    return record


@dataclass
class GridRun:
    """What :func:`run_grid` did: the merged ``table`` of all finished cells, and per-cell bookkeeping."""

    table: pd.DataFrame  # noqa: F821 - pandas is imported where the table is built
    ran: list[dict] = field(default_factory=list)  # cells computed in this call
    skipped: list[dict] = field(default_factory=list)  # cells whose result file already existed
    failed: list[tuple[dict, str]] = field(default_factory=list)  # (cell, error) of cells that did not finish

    @property
    def complete(self) -> bool:
        return not self.failed


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def run_grid(fn: Callable[[dict], dict], cells: list[dict], out_dir, backend: str = "auto", address: str | None = None,
             num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 3, init_kwargs: dict | None = None,
             csv_name: str | None = "grid.csv", workers: int = 2, threads: int = 1, desc: str | None = None) -> GridRun:
    """Run ``fn`` on every cell without a result file under ``out_dir``; merge all results.

    ``backend``: ``"ray"``, ``"serial"``, or ``"auto"`` (Ray when installed, else serial). ``address``: a Ray
    cluster (``None`` starts or reuses a local instance). ``num_cpus``/``num_gpus``: what one cell reserves, so
    Ray runs as many cells at once as the machines hold (``num_gpus=1`` puts one cell on each GPU; the cell's
    code then sees that GPU as ``cuda``). ``max_retries``: Ray's retries of a cell whose worker died (0: none).
    ``init_kwargs``: extra ``ray.init`` arguments, e.g. ``num_cpus`` of a local instance or
    ``runtime_env={"working_dir": "."}`` to ship this repository to the cluster. ``workers``/``threads``: the
    ``"processes"`` backend's pool (``fn`` must be importable by name, e.g. a ``functools.partial`` of a
    module-level function; ``desc`` labels its progress bar). A cell that raises or whose
    worker dies is reported in ``failed`` and leaves no file; the others are unaffected. The merged table is
    also written to ``<out_dir>/<csv_name>`` (atomically) unless ``csv_name`` is None.
    """
    cells = [_check_cell(c) for c in cells]
    keys = [cell_key(c) for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError("the grid lists the same cell twice: every cell dict must be unique")
    if backend == "auto":
        backend = "ray" if ray_available() else "serial"
    if backend not in ("ray", "serial", "processes"):
        raise ValueError(f"backend must be 'auto', 'ray', 'processes' or 'serial', not {backend!r}")
    out_dir = Path(out_dir)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    skipped = [c for c in cells if cell_path(out_dir, c).exists()]
    pending = [c for c in cells if not cell_path(out_dir, c).exists()]
    result = GridRun(table=None, skipped=skipped)
    if pending and backend == "serial":
        for cell in pending:
            try:
                run_cell(fn, cell, out_dir)
                result.ran.append(cell)
            except Exception as exc:  # noqa: BLE001 - one cell's failure must not stop the grid
                result.failed.append((cell, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))
    elif pending and backend == "processes":
        _run_processes(fn, pending, out_dir, result, workers, threads, desc)
    elif pending:
        _run_ray(fn, pending, out_dir, result, address, num_cpus, num_gpus, max_retries, init_kwargs or {})
    result.table = collect(out_dir, cells)
    if csv_name:
        from lib.common.utils import write_csv

        write_csv(result.table, out_dir / csv_name)
    return result


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_processes(fn, pending, out_dir, result, workers, threads, desc):
    import concurrent.futures as cf
    import multiprocessing as mp

    from lib.common.utils import progress

    if workers < 1 or threads < 1:
        raise ValueError(f"workers and threads must be >= 1, got {workers} and {threads}")
    # spawn, not fork: a forked child of a process whose torch thread pools have run can deadlock
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                initargs=(threads,)) as pool:
        futures = {pool.submit(run_cell, fn, cell, str(out_dir)): cell for cell in pending}
        for future in progress(cf.as_completed(futures), total=len(futures), desc=desc or "grid"):
            try:
                future.result()
                result.ran.append(futures[future])
            except Exception as exc:  # noqa: BLE001 - a cell's error or a dead worker: the cell is lost
                result.failed.append((futures[future], f"{type(exc).__name__}: {exc}"))


def _run_ray(fn, pending, out_dir, result, address, num_cpus, num_gpus, max_retries, init_kwargs):
    try:
        import ray
    except ImportError:
        raise ImportError("backend='ray' needs Ray: pip install ray (or use backend='serial')") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **init_kwargs)
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)(run_cell)
    fn_ref = ray.put(fn)
    refs = {task.remote(fn_ref, cell, str(out_dir)): cell for cell in pending}
    waiting = list(refs)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        try:
            record = ray.get(done[0])
            path = cell_path(out_dir, refs[done[0]])
            if not path.exists():  # the worker wrote it on another machine: keep a copy here as well
                _write_json_atomic(record, path)
            result.ran.append(refs[done[0]])
        except Exception as exc:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, node loss: the cell is lost
            result.failed.append((refs[done[0]], f"{type(exc).__name__}: {str(exc).splitlines()[0][:500]}"))


def collect(out_dir, cells: list[dict] | None = None) -> pd.DataFrame:  # noqa: F821
    """One row per finished cell (``cells``: only those, in that order; default: every file under
    ``<out_dir>/cells``): the cell's fields, then its metrics, then ``seconds`` and ``host``."""
    import pandas as pd

    folder = Path(out_dir) / "cells"
    if cells is None:
        paths = sorted(folder.glob("*.json"))
    else:
        paths = [cell_path(out_dir, c) for c in cells]
    rows = []
    for path in paths:
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        if record.get("format") != CELL_FORMAT:
            raise ValueError(f"{path} is not a grid cell file: delete it and rerun the grid")
        cell, metrics = record["cell"], record["metrics"]  # the JSON file sorts keys: restore the run's order
        row = {k: cell[k] for k in record.get("fields", cell)}
        row.update({k: metrics[k] for k in record.get("metric_names", metrics)})
        rows.append({**row, "seconds": record["seconds"], "host": record["host"]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# The RoDA table as a grid
# ----------------------------------------------------------------------------------------------------


_EXTRACTORS: dict = {}  # per process: a worker loads the backbone once for all the cells it runs


def _adapt_cell(cfg, cell: dict, fraction: float, overrides: dict):
    """The run behind a RoDA cell: bank of (task, seed), split of ``fraction``, adaptation, evaluation.
    Returns ``(result, history, bank metadata, extractor)`` of :func:`lib.experiments.roda_grid.adapt_and_evaluate`."""
    from lib.common.backbones import load_backbone
    from lib.common.utils import seed_everything
    from lib.experiments import roda_grid as roda_runner
    from lib.experiments import roda_steps as pipeline

    # each cell from the same state, whatever ran before it in this process, with torch's deterministic
    # kernels (a worker process or a notebook kernel that never seeded would otherwise accumulate the RoDA
    # loss's gradient with unordered atomic adds on two or more threads)
    seed_everything(int(cell["seed"]))
    name = (cfg["backbone"], cfg.get("backbone_weights"), cfg["device"])
    if name not in _EXTRACTORS:
        _EXTRACTORS[name] = load_backbone(*name[:2], device=cfg["device"])
    extractor, seed = _EXTRACTORS[name], int(cell["seed"])
    task = pipeline.resolve_task(cfg, cell["task"])
    model, bank = pipeline.fit_or_load_bank(cfg, task, extractor, seed=seed)
    if fraction >= 1.0:  # Table 5's transductive row: adapt on every target image, evaluate on the same
        adapt_split = eval_split = list(task.test)
    else:
        adapt_split, eval_split = pipeline.target_split(task, fraction, seed)
    config = roda_runner.config_from_profile(cfg, cell["method"], seed=seed, **overrides)
    res, hist = roda_runner.adapt_and_evaluate(model, task, adapt_split, eval_split, cell["corruption"],
                                              int(cell["severity"]), config, eval_seed=seed,
                                              batch_size=cfg["patchcore"]["batch_size"])
    return res, hist, bank, extractor


def roda_cell(cell: dict) -> dict:
    """One row of notebook 03's table (``results/<profile>/03_roda.csv``) as a cell function.

    ``cell``: ``profile``, ``task``, ``corruption``, ``severity``, ``seed``, ``method`` (``"patchcore"``: no
    adaptation; else a method of :mod:`lib.roda.adaptation`), and optionally ``stage`` (the corruption stage; default
    the profile's), ``data_root``, ``device`` (default
    ``"auto"``: the GPU Ray gave the worker, else CPU), ``out_dir`` (where the profile's cache of banks lives).
    The bank of (task, backbone, seed) is built once per machine and cached like the notebooks do.
    """
    from lib.experiments.profiles import get_profile

    cfg = get_profile(cell.get("profile", "default"), data_root=cell.get("data_root"),
                      device=cell.get("device", "auto"), out_dir=cell.get("out_dir"),
                      **({"corruption": {"stage": cell["stage"]}} if "stage" in cell else {}))
    res, _, bank, extractor = _adapt_cell(cfg, cell, cfg["corruption"]["adapt_fraction"], {})
    return dict(backbone=extractor.name, image_auroc=float(res["image_auroc"]), pixel_auroc=float(res["pixel_auroc"]),
                adapt_seconds=round(float(res["adapt_seconds"]), 1), steps=int(res["steps"]),
                diverged=res["diverged"], bank_size=int(bank["bank_size"]), device=cfg["device"])


def ablation_cell(cfg, cell: dict) -> dict:
    """One adaptation run of notebook 04 (none for ``method="patchcore"``), scored on its seed's evaluation split.

    ``cfg``: the notebook's resolved profile (bind it with ``functools.partial``); ``cell``: ``task``,
    ``seed``, ``corruption``, ``severity``, ``method``, ``fraction`` (the adaptation share of the target
    images; ``>= 1``: adapt on every target image and evaluate on the same images, Table 5's transductive
    row) and ``overrides``
    (:func:`lib.experiments.roda_grid.config_from_profile` keywords, e.g. ``augment``, ``steps``).
    Returns image / pixel AUROC, steps, adaptation seconds and the last loss.
    """
    res, hist, _, _ = _adapt_cell(cfg, cell, float(cell["fraction"]), dict(cell.get("overrides") or {}))
    return dict(image_auroc=float(res["image_auroc"]), pixel_auroc=float(res["pixel_auroc"]), steps=int(res["steps"]),
                adapt_seconds=float(res["adapt_seconds"]),
                final_loss=float(hist.loss.iloc[-1]) if len(hist) else float("nan"))


def run_cells(fn: Callable[[dict], dict], cells: list[dict], workers: int = 1, threads: int = 1,
              desc: str | None = None) -> list[dict]:
    """The metrics of ``fn`` on each cell, in order; identical cells run once. ``workers`` 1: in this process
    (the caller's threads); more: a local process pool of ``threads`` threads each (the ``"processes"``
    backend, result files in a temporary folder). Raises naming the first cell that failed."""
    from lib.common.utils import progress

    unique = {cell_key(_check_cell(c)): c for c in cells}
    if workers <= 1:
        found = {k: fn(dict(c)) for k, c in progress(list(unique.items()), desc=desc or "runs")}
    else:
        with tempfile.TemporaryDirectory(prefix="grid-") as tmp:
            run = run_grid(fn, list(unique.values()), tmp, backend="processes", workers=workers, threads=threads,
                           csv_name=None, desc=desc)
            if run.failed:
                cell, error = run.failed[0]
                raise RuntimeError(f"{len(run.failed)} of {len(unique)} runs failed; first {cell}: {error}")
            found = {k: json.loads(cell_path(tmp, c).read_text())["metrics"] for k, c in unique.items()}
    return [dict(found[cell_key(c)]) for c in cells]


def profile_cells(profile: str = "default", methods=None, seeds=None, **profile_kwargs) -> list[dict]:
    """The cells of notebook 03's table for a profile: task x corruption x severity x seed x method (each with the
    profile's corruption stage, so a result file of one stage is never taken for the other's).

    ``profile_kwargs`` go to
    :func:`lib.experiments.profiles.get_profile` (``data_root``, ``categories``, ...) and the ones a
    worker needs (``data_root``, ``out_dir``, ``device``) are copied into every cell."""
    from lib.experiments.profiles import get_profile

    cfg = get_profile(profile, **profile_kwargs)
    extra = {k: str(v) for k, v in profile_kwargs.items() if k in ("data_root", "out_dir", "device") and v is not None}
    cells = expand(profile=profile, task=list(cfg["tasks"]), corruption=list(cfg["corruption"]["names"]),
                   severity=int(cfg["corruption"]["severity"]), stage=cfg["corruption"]["stage"],
                   seed=list(seeds or cfg["seeds"]),
                   method=list(methods or cfg["roda"]["methods"]))
    return [dict(c, **extra) for c in cells]


def main(argv=None) -> int:
    """``python -m lib.experiments.executor --profile full --address auto --out results/full/grid``
    (``--gpus-per-cell 1`` on a GPU cluster)"""
    import argparse

    ap = argparse.ArgumentParser(description="Run notebook 03's RoDA table as a grid of independent cells.")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--out", required=True, help="folder of cells/*.json and grid.csv (shared by reruns)")
    ap.add_argument("--backend", default="auto", choices=("auto", "ray", "serial"))
    ap.add_argument("--address", default=None, help="Ray cluster: 'auto' on a cluster node, 'ray://head:10001'")
    ap.add_argument("--cpus-per-cell", type=float, default=1)
    ap.add_argument("--gpus-per-cell", type=float, default=0)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--categories", default=None, help="comma-separated MVTec categories (full profile)")
    ap.add_argument("--methods", default=None, help="comma-separated; default: the profile's")
    ap.add_argument("--seeds", default=None, help="comma-separated; default: the profile's")
    args = ap.parse_args(argv)
    cells = profile_cells(args.profile, methods=args.methods and args.methods.split(","),
                          seeds=args.seeds and [int(s) for s in args.seeds.split(",")], data_root=args.data_root,
                          categories=args.categories)
    run = run_grid(roda_cell, cells, args.out, backend=args.backend, address=args.address,
                   num_cpus=args.cpus_per_cell, num_gpus=args.gpus_per_cell)
    print(f"{len(run.ran)} cells ran, {len(run.skipped)} were done already, {len(run.failed)} failed; "
          f"table: {Path(args.out) / 'grid.csv'}")
    for cell, error in run.failed:
        print(f"FAILED {cell}: {error.splitlines()[0]}")
    return 1 if run.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
