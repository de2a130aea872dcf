#!/usr/bin/env python
"""Run the numbered notebooks headlessly through papermill, in order, for one profile.

    python scripts/run_notebooks.py --profile default            # the main job
    python scripts/run_notebooks.py --profile real --only 02 03  # a subset
    python scripts/run_notebooks.py --profile smoke --out-dir /tmp/x
    python scripts/run_notebooks.py --profile real --categories ksdd --set roda.epochs=5

Executed copies go to ``<out-dir>/runs/<profile>/``; figures and tables to ``figures/<profile>/`` and
``results/<profile>/``, with the resolved settings in ``results/<profile>/config.json``. Before any notebook
starts, every ``--set`` is checked (known key, type, range; close matches for typos), ``--data-root`` must
exist, the data of every task the notebooks will read is found and listed (categories, layout, ``labels.csv``;
an unknown category names those found under the root), and every output folder must be writable; such an
error writes nothing. A failing notebook stops the run and names the failing cell.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
#: the profiles of lib/experiments/profiles.py (kept equal by tests/test_inputs.py; the script parses its
#: arguments before it imports lib)
PROFILE_NAMES = ("smoke", "default", "elpv", "real", "real_full", "full")
#: the notebooks that read the DPDL tasks (``dpdl.tasks``); every notebook reads the RoDA tasks (``tasks``)
DPDL_NOTEBOOKS = ("05", "06")
#: tasks a run generates itself (under its cache), so there is nothing to find before it starts
GENERATED_TASKS = ("synthetic", "synthetic_labelled")


def profile_name(text: str) -> str:
    """``--profile``: a known profile, or the error with the closest name (``smok`` -> ``smoke``)."""
    if text in PROFILE_NAMES:
        return text
    close = difflib.get_close_matches(text, PROFILE_NAMES, n=1)
    raise argparse.ArgumentTypeError(f"unknown profile {text!r}: choose one of {', '.join(PROFILE_NAMES)}"
                                     + (f" (did you mean {close[0]!r}?)" if close else ""))


def notebooks(only=None) -> list[Path]:
    found = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if p.name[:2] in set(only)]
    return found


def run_one(path: Path, out: Path, parameters: dict, timeout: int | None = None, progress: bool = False) -> float:
    """Execute one notebook; with ``progress`` papermill shows a bar of its cells (count, elapsed, ETA)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    t0 = time.perf_counter()
    bar = dict(desc=f"{path.stem[:24]:<24}", unit="cell", dynamic_ncols=True,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} cells [{elapsed}<{remaining}]")
    try:
        pm.execute_notebook(str(path), str(out), parameters=parameters, cwd=str(NOTEBOOKS), kernel_name="python3",
                            progress_bar=bar if progress else False, log_output=False, execution_timeout=timeout)
    except PapermillExecutionError as err:
        raise SystemExit(
            f"\nFAILED: {path.name}, cell {err.cell_index} (execution count {err.exec_count}): "
            f"{err.ename}: {err.evalue}\nexecuted copy with the traceback: {out}"
        ) from None
    return time.perf_counter() - t0


def check_data(cfg, todo) -> None:
    """Find the data of every task the notebooks ``todo`` will read, through the loaders the notebooks use (files
    are listed and ``labels.csv`` read; no image is decoded): the RoDA tasks, and the DPDL tasks when notebook 05
    or 06 runs. Generated tasks are skipped. :class:`lib.common.data.DataError` (or an unknown task name's
    ``RegistryError``) names the task and the fix."""
    from lib.common.data import load_task
    from lib.dpdl.protocol import load_openset_task
    from lib.experiments.profiles import data_root_for

    ablation = cfg["ablation"]
    roda = [*cfg["tasks"], *(ablation["tasks"] or ()), *(ablation["diagnosis"]["tasks"] or ())]
    dpdl = list(cfg["dpdl"]["tasks"]) if any(nb.name[:2] in DPDL_NOTEBOOKS for nb in todo) else []
    for name in dict.fromkeys(roda):
        if name not in GENERATED_TASKS:
            _for_task(name, load_task, name, data_root_for(cfg, name))
    for name in dict.fromkeys(dpdl):
        if name not in GENERATED_TASKS:
            _for_task(name, load_openset_task, name, data_root_for(cfg, name), image_size=cfg["dpdl"]["image_size"])


def _for_task(name, load, *args, **kwargs):
    from lib.common.data import DataError
    from lib.common.registry import RegistryError

    try:
        load(*args, **kwargs)
    except (DataError, RegistryError) as err:
        raise DataError(f"task {name!r}: {err}") from None


def check_arguments(ap: argparse.ArgumentParser, args, todo=()) -> None:
    """Everything that can be checked before a kernel starts: the ``--set`` overrides (handed to every kernel
    through the environment), the resolved profile (keys, types, ranges), ``--data-root``, the data the notebooks
    ``todo`` will read (:func:`check_data`), and that every output folder is writable; nothing is written before
    the data is found. Problems end the run here with an argparse error (exit code 2)."""
    sys.path.insert(0, str(REPO))
    from lib.common.data import DataError
    from lib.common.utils import OutputError, ensure_writable
    from lib.experiments.profiles import OVERRIDES_ENV, get_profile, resolve
    from lib.experiments.settings import SettingsError, parse_assignments

    try:
        os.environ[OVERRIDES_ENV] = json.dumps(parse_assignments(args.set))
        if args.data_root is not None and not Path(args.data_root).expanduser().is_dir():
            raise SettingsError(f"--data-root {args.data_root}: no such folder (pass the folder that holds the data)")
        where = dict(data_root=args.data_root, categories=args.categories, device=args.device, seed=args.seed,
                     out_dir=args.out_dir)
        check_data(resolve(args.profile, **where), todo)  # before anything is written
        get_profile(args.profile, **where)
        ensure_writable((Path(args.out_dir) if args.out_dir else REPO) / "runs" / args.profile, "runs folder")
    except (SettingsError, OutputError, DataError) as err:
        ap.error(str(err))
    except (RuntimeError, ValueError) as err:  # e.g. --device cuda without CUDA
        ap.error(f"{type(err).__name__}: {err}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default", type=profile_name, metavar="{" + ",".join(PROFILE_NAMES) + "}")
    ap.add_argument("--only", nargs="*", help="two-digit notebook numbers to run (default: all)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--categories", default=None, help="comma-separated, e.g. screw,bottle or ksdd")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out-dir", default=None, help="where results/, figures/ and runs/ go (default: the repo)")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per cell")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a profile value, e.g. --set roda.epochs=5 --set 'roda.variants={}'")
    args = ap.parse_args(argv)
    todo = notebooks(args.only)
    if not todo:
        raise SystemExit(f"no notebooks match {args.only} in {NOTEBOOKS}")
    check_arguments(ap, args, todo)
    out_root = Path(args.out_dir) if args.out_dir else REPO
    run_dir = out_root / "runs" / args.profile
    params = dict(profile=args.profile, data_root=args.data_root, categories=args.categories, device=args.device,
                  seed=args.seed, out_dir=str(out_root) if args.out_dir else None)
    rows, started = [], time.perf_counter()
    for i, nb in enumerate(todo, 1):
        elapsed = _clock(time.perf_counter() - started)
        print(f"[{args.profile}] {i}/{len(todo)} {nb.name} (elapsed {elapsed})", flush=True)
        t0 = time.perf_counter()
        try:
            seconds = run_one(nb, run_dir / nb.name, params, args.timeout, progress=True)
        except (SystemExit, KeyboardInterrupt):
            rows.append((nb.name, "FAILED", time.perf_counter() - t0, run_dir / nb.name))
            print_summary(rows, todo, args.profile, time.perf_counter() - started)
            write_summary(rows, todo, run_dir / "summary.csv")
            raise
        rows.append((nb.name, "ok", seconds, run_dir / nb.name))
        print(f"[{args.profile}] {nb.name} done in {_clock(seconds)}", flush=True)
    print_summary(rows, todo, args.profile, time.perf_counter() - started)
    print(f"summary: {write_summary(rows, todo, run_dir / 'summary.csv')}")
    print(f"figures: {out_root / 'figures' / args.profile}\ntables:  {out_root / 'results' / args.profile}")
    return 0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _every_notebook(rows, todo) -> list:
    """``rows`` (name, status, seconds, executed copy) followed by a "not run" row for each notebook not reached."""
    done = {name for name, *_ in rows}
    return list(rows) + [(nb.name, "not run", None, None) for nb in todo if nb.name not in done]


def print_summary(rows, todo, profile: str, total: float) -> None:
    """One line per notebook: status, wall time, executed copy; notebooks not reached are listed too."""
    rows = _every_notebook(rows, todo)
    width = max(len(name) for name, *_ in rows)
    print(f"\nsummary ({profile} profile, total {_clock(total)})")
    print(f"  {'notebook':<{width}}  {'status':<7}  {'time':>8}  executed copy")
    for name, status, seconds, out in rows:
        print(f"  {name:<{width}}  {status:<7}  {_clock(seconds) if seconds is not None else '-':>8}  {out or '-'}")
    print(flush=True)


def write_summary(rows, todo, path: Path) -> Path:
    """The summary as ``runs/<profile>/summary.csv`` (notebook, status, minutes, executed copy), written
    atomically: the record a timing in the README is transcribed from (``benchmarks/results/notebook_timings.csv``)."""
    import csv

    from lib.common.utils import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["notebook", "status", "minutes", "executed_copy"])
        for name, status, seconds, copy in _every_notebook(rows, todo):
            out.writerow([name, status, "" if seconds is None else f"{seconds / 60:.2f}", copy or ""])
    return path


if __name__ == "__main__":
    sys.exit(main())
