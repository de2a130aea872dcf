"""Direct runs of the notebook-05 runner (lib.dpdl.baselines.run_openset) outside papermill, one dataset and
setting per job (parallel jobs and long real-data grids in the background; a job's file is rewritten after every
split, so a stopped job keeps what it finished), and the fold of those jobs into notebook 05's own tables. Usage:

    OMP_NUM_THREADS=1 python scripts/run_dpdl.py TASK JOB.csv SEEDS M_VALUES METHODS [EPOCHS] [SETTING]
    python scripts/run_dpdl.py --tables PROFILE JOB.csv [JOB.csv ...]
    python scripts/run_dpdl.py --compare OUT.csv JOB.csv [JOB.csv ...]

A job writes its runs (one row per split and method, the notebook's ``*_runs.csv`` columns plus ``schedule``,
``image_size``, ``finetune`` and ``device``) to ``JOB.csv``, e.g.
``scripts/run_dpdl.py headct runs/dpdl/headct_general.csv 0,1,2,3,4 10,1 dpdl,devnet,dra,flos 50``; keep job
files outside ``results/`` (``runs/`` is not tracked). ``--tables`` folds job files into the tables notebook 05
writes, under its names, in ``results/<PROFILE>/`` (and its figures in ``figures/<PROFILE>/``; the profile's
``config.json`` beside them): a job that ran DPDL variants (:data:`VARIANTS`) gives ``05_ablation_runs.csv``,
``05_ablation.csv`` and ``05_ablation_delta.csv`` (its ``dpdl`` rows are the full model, ``DPDL``); every other
job gives ``05_general_runs.csv`` / ``05_hard_runs.csv`` by its ``setting``, and with them ``05_general.csv``,
``05_hard.csv``, ``05_where_dpdl_wins.csv`` and ``05_protocol.csv`` (lib.dpdl.tables, as in the notebook). A
later job's row replaces an earlier one's with the same task, setting, seen class, M, method and seed (in the
ablation tables also the same schedule: runs of each schedule stay side by side, each variant paired with the full
model of its own schedule). To add
jobs to the current tables name those first, e.g. ``--tables real_full results/real_full/05_general_runs.csv
results/real_full/05_hard_runs.csv NEW.csv``; a runs table that would lose runs is not replaced.
``--compare`` joins runs of different configurations (fine-tuning, size, device) into one table with a
``config`` column.

Environment: ``TAIL=1 TAIL_LAYER=features.18`` fine-tunes that backbone block on cached ``TAIL_INPUT``
(default ``features.17``) activations; ``TAIL=1 TAIL_INPUT=input`` fine-tunes the whole network up to the
deep tap end to end on cached normalised images; ``DEVICE=cuda`` trains and caches on the GPU; ``THREADS``
sets the CPU threads (1); ``DATA_ROOT`` replaces the profile's data root; ``IMAGE_SIZE`` overrides the
profile's ``dpdl.image_size``; ``OUT_DIR`` puts ``--tables``' results/ and figures/ there instead of the
repository. Method names: any of lib.dpdl.baselines.METHODS, or the DPDL variants below.
Settings are the profile's (``elpv`` for elpv, ``real_full`` otherwise; ``PROFILE=real_full`` for the uncapped
ELPV) unless given.
"""

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common import backbones, data
from lib.common.utils import read_csv, save_figure, write_csv
from lib.dpdl import baselines, features, protocol, tables
from lib.dpdl import model as dpdl
from lib.experiments import profiles
from lib.reporting import figures
from lib.reporting.fidelity import PAPER_SCHEDULE

#: DPDL variants by their label in notebook 05's ablation tables (its order first, then two more head subsets)
VARIANTS = {"w/o DPL": dict(use_dpl=False), "w/o DFL": dict(use_dfl=False), "M_r": dict(heads=("r",)),
            "M_n + M_r": dict(heads=("n", "r")), "M_a + M_r": dict(heads=("a", "r")),
            "Eq. 22 literal": dict(residual="bridge"), "bridge DPL": dict(dpl_form="bridge"),
            "M_a + M_n": dict(heads=("a", "n")), "M_a": dict(heads=("a",))}
#: the keys of one run: a later job's row replaces an earlier one's with the same keys
RUN_KEYS = ["task", "setting", "seen_class", "n_anomalies", "method", "seed"]


def main(task_name, out, seeds, m_values, methods, epochs=None, setting="general"):
    if not out.endswith(".csv"):
        example = f"runs/dpdl/{task_name.replace('/', '_')}_{setting}.csv"
        raise SystemExit(f"the job file must be a .csv path (e.g. {example}), got {out!r}")
    torch.set_num_threads(int(os.environ.get("THREADS", 1)))
    cfg = profiles.get_profile(os.environ.get("PROFILE") or ("elpv" if task_name == "elpv" else "real_full"),
                               data_root=os.environ.get("DATA_ROOT"))
    dp = dict(cfg.dpdl, image_size=int(os.environ.get("IMAGE_SIZE", cfg.dpdl["image_size"])))
    seeds = [int(s) for s in seeds.split(",")]
    m_values = [int(m) for m in m_values.split(",")]
    task = protocol.load_openset_task(task_name, profiles.data_root_for(cfg, task_name), image_size=dp["image_size"])
    task = replace(task, train=tuple(data.subsample(task.train, dp.get("max_train"), 0)),
                   test=tuple(data.subsample(task.test, dp.get("max_test"), 0)))
    splits = protocol.split_plan(task, (setting,), m_values, seeds)
    deep_tap = backbones.BACKBONES[cfg.backbone].deep_tap
    device = os.environ.get("DEVICE", "cpu")
    # TAIL=1: partial fine-tuning, cache the activations before the last block and train that block;
    # TAIL_INPUT=input: end to end, cache the normalised images and train the whole network up to the deep tap
    end_to_end = bool(os.environ.get("TAIL")) and os.environ.get("TAIL_INPUT") == "input"
    tail_name = (os.environ.get("TAIL_LAYER") or "features.18") if os.environ.get("TAIL") else None
    tap = deep_tap if end_to_end or not tail_name else os.environ.get("TAIL_INPUT", "features.17")
    extractor = backbones.load_backbone(cfg.backbone, weights=cfg.backbone_weights, layers=[tap], device=device)
    if end_to_end:
        tail, tap = backbones.input_to_tap(extractor), "input"
        extractor = features.NormalizedInput(extractor)
    else:
        tail = extractor.model.get_submodule(tail_name) if tail_name else None
    path = f"{cfg.cache_dir}/05_maps_{task_name.replace('/', '_')}_{cfg.backbone}_{dp['image_size']}" + \
        (f"_{tap}.pt" if tail_name else ".pt")
    cache = dpdl.MapCache(extractor, **task.geometry(), batch_size=32, path=path, device=device)
    n0 = len(cache)
    cache.maps(list(task.train) + list(task.test))
    cache.pseudo_maps(task.train, dp.get("pseudo_variants", 1))
    cache.rotated_maps(task.train, dp.get("rotation_variants", 0)) if dp.get("rotation_variants", 0) else None
    if len(cache) > n0:
        cache.save()
    kw = dict(n_prototypes=dp["n_prototypes"], eps=dp["eps"], **dp.get("dpdl_kwargs", {}))
    base_kw = {} if tail is None else dict(tail=tail)
    kw.update(base_kw)
    specs = {}
    for m in methods.split(","):
        if m == "dpdl":
            specs["dpdl"] = ("dpdl", kw)
        elif m in VARIANTS:
            specs[m] = ("dpdl", {**kw, **VARIANTS[m]})
        else:
            specs[m] = (m, dict(base_kw))
    train = dpdl.TrainConfig(epochs=int(epochs or dp["epochs"]), iterations=dp["iterations"],
                             batch_size=dp["batch_size"], device=device)
    start = time.time()
    finetune = "end_to_end" if end_to_end else (f"tail:{tail_name}" if tail_name else "frozen")
    print(f"{finetune}, {dp['image_size']} px, {device}", flush=True)
    done = []
    for split in splits:  # one split at a time, the runs file rewritten after each (a stopped job keeps them)
        part, _ = baselines.run_openset([split], cache, specs, train, dp.get("pseudo_variants", 1),
                                                show_progress=False,
                                                rotation_variants=dp.get("rotation_variants", 0))
        done.append(part)
        runs = pd.concat(done, ignore_index=True)
        runs["schedule"] = f"{train.epochs}x{train.iterations}x{train.batch_size}"
        runs["image_size"], runs["finetune"], runs["device"] = dp["image_size"], finetune, str(device)
        write_csv(runs, out)
        print(f"seed {split.seed}: " + ", ".join(f"{m} {a:.3f}" for m, a in zip(part["method"], part["auroc"])),
              f"({time.time() - start:.0f} s)", flush=True)
    table = protocol.aggregate_runs(runs, ["task", "setting", "seen_class", "n_anomalies", "method"])
    print(table.to_string(), f"\n{out}: {len(runs)} runs, {time.time() - start:.0f} s")


def _ordered(runs: pd.DataFrame, cfg, methods) -> pd.DataFrame:
    """Rows in the notebook's order: task (the profile's), setting, M (the profile's), seen class, seed, method."""
    runs = runs.reset_index(drop=True)

    def rank(column, order):
        known = {v: i for i, v in enumerate(order)}
        return runs[column].map(lambda v: known.get(v, len(known)))

    keys = pd.DataFrame({"task": rank("task", cfg.dpdl["tasks"]), "setting": rank("setting", protocol.SETTINGS),
                         "m": rank("n_anomalies", cfg.dpdl["n_anomalies"]), "seen": runs["seen_class"].astype(str),
                         "seed": runs["seed"], "method": rank("method", methods)})
    return runs.iloc[keys.sort_values(list(keys.columns), kind="stable").index].reset_index(drop=True)


def _schedule(runs: pd.DataFrame) -> str:
    """``, schedule 50x20x16`` (epochs x iterations x batch) for a figure title, when the runs name theirs."""
    schedules = sorted(runs["schedule"].dropna().unique()) if "schedule" in runs else []
    return f", schedule {' / '.join(schedules)}" if schedules else ""


def _check_nothing_lost(path: Path, new: pd.DataFrame | None) -> None:
    """Refuse to replace the runs table at ``path`` by one that lacks some of its runs (a partial list of jobs)."""
    if not path.is_file():
        return
    old = pd.read_csv(path)
    keys = [k for k in RUN_KEYS if k in old]
    kept = set(map(tuple, new[keys].astype(str).to_numpy())) if new is not None and len(new) else set()
    lost = [k for k in map(tuple, old[keys].astype(str).to_numpy()) if k not in kept]
    if lost:
        raise SystemExit(f"{path} holds {len(lost)} runs that the jobs do not (e.g. {dict(zip(keys, lost[0]))}): "
                         f"name it among the jobs to keep them (a later job's row replaces its own)")


def _fold(files, rename=None, by_schedule: bool = False) -> pd.DataFrame:
    """The runs of ``files``, a later file's row replacing an earlier one's with the same :data:`RUN_KEYS`
    (methods renamed by ``rename`` first; with ``by_schedule`` runs of different schedules are kept side by side)."""
    runs = pd.concat([read_csv(f) for f in files], ignore_index=True)  # with their timings
    if rename:
        runs["method"] = runs["method"].replace(rename)
    keys = RUN_KEYS + (["schedule"] if by_schedule and "schedule" in runs.columns else [])
    return runs.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)


def write_tables(profile, *files):
    """Notebook 05's tables of ``profile`` from job files (see the module docstring); prints what it wrote."""
    if not files:
        raise SystemExit("--tables PROFILE JOB.csv [JOB.csv ...]: name the job files to fold")
    where = dict(data_root=os.environ.get("DATA_ROOT"), out_dir=os.environ.get("OUT_DIR"))
    cfg = profiles.resolve(profile, device="cpu", **where)  # checked first; get_profile below writes config.json
    jobs = {Path(f): read_csv(f) for f in files}
    ablation_files = [f for f, runs in jobs.items() if set(runs["method"]) & set(VARIANTS)]
    runs = _fold([f for f in jobs if f not in ablation_files]) if len(ablation_files) < len(jobs) else None
    out, figs = Path(cfg.results_dir), Path(cfg.figures_dir)
    written = []

    def write(df, name):
        written.append(write_csv(df, out / name))

    methods = list(cfg.dpdl.get("methods", baselines.METHODS))
    general = hard = ablation = None
    if runs is not None:
        general = _ordered(runs[runs.setting == "general"], cfg, methods)
        hard = _ordered(runs[runs.setting == "hard"], cfg, methods)
        if not len(general):
            raise SystemExit("the jobs hold no general-setting runs: the tables of both settings are written together")
        _check_nothing_lost(out / "05_general_runs.csv", general)
        _check_nothing_lost(out / "05_hard_runs.csv", hard)
    if ablation_files:
        # the ablations keep each schedule's runs (tables.ablation_tables pairs within a schedule)
        ablation = _fold(ablation_files, rename={"dpdl": tables.ABLATION_BASE}, by_schedule=True)
        ablation = _ordered(ablation, cfg, [tables.ABLATION_BASE, *VARIANTS])
        _check_nothing_lost(out / "05_ablation_runs.csv", ablation)
    profiles.get_profile(profile, device="cpu", **where)  # the folders checked and config.json written beside
    if general is not None:
        write(tables.protocol_table(general, hard), "05_protocol.csv")
        write(general, "05_general_runs.csv")
        general_table = tables.general_table(general)
        write(general_table, "05_general.csv")
        hard_table = None
        if len(hard):
            write(hard, "05_hard_runs.csv")
            hard_table = tables.hard_table(hard)
            write(hard_table, "05_hard.csv")
        write(tables.where_dpdl_wins(general_table, hard_table), "05_where_dpdl_wins.csv")
        for m in sorted(general.n_anomalies.unique(), reverse=True):
            sub = general[general.n_anomalies == m]
            fig = figures.auroc_bars(sub, x="task", y="auroc", hue="method", err="sd", ylim=(0.4, 1.0),
                                     title=f"General setting, M = {m} (mean ± std over {sub.seed.nunique()} seeds"
                                           f"{_schedule(sub)})")
            written.append(save_figure(fig, figs / f"05_general_M{m}.png"))
    if ablation is not None:
        write(ablation, "05_ablation_runs.csv")
        table, delta = tables.ablation_tables(ablation)
        write(table, "05_ablation.csv")
        write(delta, "05_ablation_delta.csv")
        # the paper's 50 x 20 runs where there are any: one schedule per figure
        paper = ablation["schedule"].astype(str).str.startswith(PAPER_SCHEDULE) if "schedule" in ablation else None
        shown = ablation[paper] if paper is not None and paper.any() else ablation
        title = f"Ablations, general setting, M = {shown.n_anomalies.max()}{_schedule(shown)}"
        fig = figures.auroc_bars(shown, x="task", y="auroc", hue="method", err="sd", ylim=(0.4, 1.0), title=title)
        written.append(save_figure(fig, figs / "05_ablation.png"))
    for path in written:
        print(path)
    for name, df in (("general", general), ("hard", hard), ("ablation", ablation)):
        if df is not None and len(df) and "schedule" in df:
            seeds = sorted(int(s) for s in df.seed.unique())
            print(f"{name}: schedule(s) {sorted(df['schedule'].dropna().unique())}, seeds {seeds}")


def compare(out, *files):
    """One runs table over several runs files that differ in configuration, with a ``config`` column naming
    each (fine-tuning, image size, device; files written before those columns existed hold frozen 224 px CPU
    runs), and the mean and std of the AUROC per task, M, method and configuration printed."""
    runs = pd.concat([read_csv(f) for f in files], ignore_index=True)  # with their timings
    for column, default in (("finetune", "frozen"), ("image_size", 224), ("device", "cpu")):
        runs[column] = runs[column].fillna(default) if column in runs else default
    runs["image_size"] = runs["image_size"].astype(int)
    runs["config"] = runs["finetune"] + " " + runs["image_size"].astype(str) + " px (" + runs["device"] + ")"
    write_csv(runs, out)
    table = runs.groupby(["task", "setting", "n_anomalies", "method", "config", "schedule"], sort=False)["auroc"]
    print(table.agg(["mean", "std", "count"]).round(3).to_string())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--tables"]:
        write_tables(*sys.argv[2:])
    elif sys.argv[1:2] == ["--compare"]:
        compare(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
