"""Run a RoDA grid (lib.experiments.roda_grid.run_grid) from the command line, resumable, for long background runs.

    OMP_NUM_THREADS=1 python scripts/run_roda_grid.py --profile real_full --tasks mvtec/screw --seeds 0 \
        --methods patchcore,roda,recommended --stage native --out runs/roda_grid/screw.csv    # a job's own file
    python scripts/run_roda_grid.py --curves --tasks mvtec/bottle --methods roda_robust_matched \
        --out results/real_full/08_epoch_curves.csv     # AUROC after every epoch, the stop rule off
    python scripts/run_roda_grid.py --out results/real_full/08_roda_grid.csv --merge A.csv B.csv \
        --history results/real_full/08_roda_grid_histories.csv --merge-history A_hist.csv B_hist.csv

    python scripts/run_roda_grid.py --backend ray --address auto --profile full --out results/full/grid
        # notebook 03's table as independent cells on a Ray cluster (or --backend processes: local workers)

Parallel jobs must not share an output file, so each writes its own; ``--merge`` folds their rows (and each
one's ``*_timings.csv``) into ``--out`` (a later file's row replaces an earlier one's for the same task, backbone,
method, corruption, seed, severity and corruption stage), ``--merge-history`` their per-step histories into
``--history``, atomically. ``--stage`` / ``--severity`` override the profile's ``corruption.stage`` /
``corruption.severity``; rows of both stages share one table, and the summary compares methods within a stage and
severity, never across them.
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import product
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common import backbones, registry
from lib.common.corruptions import STAGES, stage_of
from lib.common.utils import read_csv, seed_everything, timings_path, write_csv
from lib.experiments import profiles, roda_grid

DEFAULT_METHODS = "patchcore,ttt++,ttac,roda,roda_robust"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="real_full")
    p.add_argument("--tasks", default=None, help="comma-separated (required unless merging)")
    p.add_argument("--merge", nargs="+", default=None, help="grid CSVs of parallel jobs to fold into --out")
    p.add_argument("--merge-history", nargs="+", default=None, help="their histories, folded into --history")
    p.add_argument("--corruptions", default=",".join(registry.PAPER_CORRUPTIONS))
    p.add_argument("--methods", default=None, help=f"comma-separated (default: {DEFAULT_METHODS}; with "
                   "--backend ray / processes / serial: the profile's)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--bank-seed", type=int, default=0, help="one bank per task built with this seed (-1: per seed)")
    p.add_argument("--out", required=True)
    p.add_argument("--history", default=None)
    p.add_argument("--variants", default=None, help="JSON dict of extra named variants (diagnosis leads)")
    p.add_argument("--data-root", default=None, help="data root (default: the profile's)")
    p.add_argument("--note", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stage", default=None, choices=STAGES,
                   help="where the corruption is applied (default: the profile's corruption.stage)")
    p.add_argument("--severity", type=int, default=None, help="default: the profile's corruption.severity")
    p.add_argument("--backbone", default=None,
                   help="the encoder (default: the profile's backbone); rows record it, a resumed job skips only "
                        "its own backbone's rows, and its banks are cached per backbone")
    p.add_argument("--summary", default=None,
                   help="versus-reference table of the whole --out file (default: <out>_vs_<reference>.csv)")
    p.add_argument("--reference", default="patchcore",
                   help="the method every other is compared with, cell by cell, in the summary (default: patchcore)")
    p.add_argument("--summary-only", action="store_true", help="only (re)write the summary of --out")
    p.add_argument("--curves", action="store_true",
                   help="per-epoch curves instead (roda_grid.epoch_curve, stop rule off, --epochs passes): "
                        "one curve per task x corruption x seed x method appended to --out, finished ones skipped")
    p.add_argument("--epochs", type=int, default=None, help="with --curves: epochs per curve (default: profile)")
    p.add_argument("--backend", default="table", choices=("table", "ray", "processes", "serial"),
                   help="table (default): one process, rows appended to --out as they finish; ray / processes / "
                        "serial: the profile's cells (lib.experiments.roda_cells) through lib.experiments.executor, "
                        "one result file per cell under the folder --out, the table in <out>/grid.csv")
    p.add_argument("--address", default=None, help="--backend ray: 'auto' on a cluster node, 'ray://head:10001'")
    p.add_argument("--workers", type=int, default=2, help="--backend processes: local worker processes")
    p.add_argument("--cpus-per-cell", type=float, default=1)
    p.add_argument("--gpus-per-cell", type=float, default=0)
    args = p.parse_args(argv)
    if args.merge or args.merge_history:
        return merge(args)
    if args.backend != "table":
        return cells(args)
    if not args.summary_only:
        if not args.tasks:
            p.error("--tasks is required (unless --summary-only or --merge)")
        torch.set_num_threads(args.threads)
        seed_everything(0)  # deterministic kernels; every run seeds its own generators from its seed
        cfg = profiles.get_profile(args.profile, data_root=args.data_root, corruption=_shift(args),
                                   **({"backbone": args.backbone} if args.backbone else {}))
        specs = {**profiles.DECOMPOSITION_VARIANTS, **profiles.TABLE4_VARIANTS, **roda_grid.method_specs(cfg)}
        if args.variants:
            import json

            specs.update(json.loads(args.variants))
        unknown = [m for m in (args.methods or DEFAULT_METHODS).split(",") if m not in specs]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}: the profile's are {sorted(specs)}; others (e.g. "
                             "hungarian, continuous_ot) through --variants "
                             "'{\"hungarian\": {\"method\": \"hungarian\"}}'")
        methods = {m: specs[m] for m in (args.methods or DEFAULT_METHODS).split(",")}
        if args.curves:
            return curves(cfg, args, methods)
        extractor = backbones.load_backbone(cfg.backbone, weights=cfg.backbone_weights, device=cfg.device)
        roda_grid.run_grid(cfg, extractor, args.tasks.split(","), args.corruptions.split(","), methods,
                             [int(s) for s in args.seeds.split(",")], args.out, history_csv=args.history,
                             bank_seed=None if args.bank_seed < 0 else args.bank_seed, note=args.note)
    out = Path(args.out)
    summary = Path(args.summary) if args.summary else out.with_name(f"{out.stem}_vs_{args.reference}.csv")
    write_csv(summarise_by_stage(pd.read_csv(out), args.reference), summary)
    print(f"summary: {summary}")


def _shift(args) -> dict:
    """The profile's corruption settings that --stage and --severity replace."""
    return {k: v for k, v in (("stage", args.stage), ("severity", args.severity)) if v is not None}


def summarise_by_stage(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """:func:`lib.experiments.roda_grid.versus_reference` within each (stage, severity): the two stages are two
    protocols and are never averaged together."""
    table = _with_stage(table)
    by = [c for c in ("stage", "severity") if c in table]
    parts = [roda_grid.versus_reference(g, reference=reference, margin=0.05).assign(**dict(zip(by, values)))
             for values, g in table.groupby(by, sort=True)]
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return out[by + [c for c in out.columns if c not in by]] if len(out) else out


def _with_stage(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(stage=stage_of(table))


def cells(args) -> int:
    """The profile's table (task x corruption x severity x seed x method) as independent cells."""
    from lib.experiments import executor, roda_cells

    methods = args.methods.split(",") if args.methods else None
    todo = roda_cells.profile_cells(args.profile, methods=methods, seeds=[int(s) for s in args.seeds.split(",")],
                                    data_root=args.data_root, categories=None, corruption=_shift(args))
    if args.tasks:
        todo = [c for c in todo if c["task"] in args.tasks.split(",")]
    run = executor.run_parallel(roda_cells.roda_cell, todo, args.out, backend=args.backend, address=args.address,
                                workers=args.workers, threads=args.threads, num_cpus=args.cpus_per_cell,
                                num_gpus=args.gpus_per_cell)
    print(f"{len(run.ran)} cells ran, {len(run.skipped)} were done already, {len(run.failed)} failed; "
          f"table: {Path(args.out) / 'grid.csv'}")
    for cell, error in run.failed:
        print(f"FAILED {cell}: {error.splitlines()[0]}")
    return 1 if run.failed else 0


KEYS = ["task", "backbone", "method", "condition", "seed", "severity", "stage"]


def _fold(target: Path, sources, keys) -> int:
    """``target`` with the rows of ``sources`` appended, a source row replacing the target's rows of the same
    ``keys`` (all rows of that key, so a history's steps are replaced as a whole); written atomically."""
    from lib.common.utils import atomic_path

    frames = [_with_stage(pd.read_csv(target))] if target.is_file() else []
    for source in sources:
        new = _with_stage(pd.read_csv(source))
        if frames:
            old = pd.concat(frames, ignore_index=True)
            on = [k for k in keys if k in old and k in new]  # a table without severity: a single severity
            hit = old[on].merge(new[on].drop_duplicates(), on=on, how="left", indicator=True)["_merge"]
            frames = [old[(hit == "left_only").to_numpy()]]
        frames.append(new)
    merged = pd.concat(frames, ignore_index=True)
    with atomic_path(target) as tmp:
        merged.to_csv(tmp, index=False)
    return len(merged)


def merge(args) -> None:
    out = Path(args.out)
    if args.merge_history and not args.history:
        raise SystemExit("--merge-history needs --history (the table to fold them into)")
    missing = [f"--merge {f}" for f in args.merge or () if not Path(f).is_file()]
    missing += [f"--merge-history {f}" for f in args.merge_history or () if not Path(f).is_file()]
    if missing:  # checked before anything is folded: the table and its histories change together or not at all
        raise SystemExit(f"nothing folded: {'; '.join(missing)} does not exist (a job that adapted nothing, e.g. "
                         "PatchCore alone, writes no histories: leave it out of --merge-history)")
    if args.merge:
        sources = [Path(source) for source in args.merge]
        print(f"{out}: {_fold(out, sources, KEYS)} rows after folding {len(sources)} file(s)")
        timings = [t for t in map(timings_path, sources) if t.is_file()]
        if timings:
            _fold(timings_path(out), timings, KEYS)
    if args.merge_history:
        print(f"{args.history}: {_fold(Path(args.history), args.merge_history, KEYS)} rows")


def curves(cfg, args, methods):
    """Every (task, corruption, seed, method) curve, appended to ``--out`` (atomically) as it finishes."""
    out = Path(args.out)
    done = read_csv(out) if out.is_file() else pd.DataFrame()  # with the finished curves' timings
    keys = set(done[["task", "condition", "seed", "method"]].itertuples(index=False, name=None)) if len(done) else set()
    extractor = backbones.load_backbone(cfg.backbone, weights=cfg.backbone_weights, device=cfg.device)
    seeds = [int(s) for s in args.seeds.split(",")]
    for task, corruption, seed, name in product(args.tasks.split(","), args.corruptions.split(","), seeds, methods):
        if (task, corruption, seed, name) in keys:
            continue
        t0 = time.time()
        curve = roda_grid.epoch_curve(cfg, extractor, task, corruption, methods[name], seed=seed,
                                        epochs=args.epochs, bank_seed=max(args.bank_seed, 0))
        curve = curve.assign(method=name, note=args.note, seconds=round(time.time() - t0, 1))
        done = pd.concat([done, curve], ignore_index=True)
        write_csv(done, out)
        print(f"{task} {corruption} s{seed} {name}: pixel "
              f"{' '.join(f'{100 * v:.1f}' for v in curve.pixel_auroc)}", flush=True)
    draw_curves(cfg, out)


def draw_curves(cfg, out: Path) -> None:
    """``figures/<profile>/<out stem>.png``: the curves of ``out`` (lib.reporting.figures.epoch_curves), pixel AUROC."""
    from lib.common.utils import save_figure
    from lib.reporting import figures

    path = Path(cfg["figures_dir"]) / f"{out.stem}.png"
    save_figure(figures.epoch_curves(pd.read_csv(out), title="pixel AUROC per adaptation epoch"), path)
    print(f"figure: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
