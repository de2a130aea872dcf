"""Direct runs of the notebook-05 runner (lib.dpdl.baselines.run_openset) outside papermill, for the
real-data DPDL measurements quoted in the README (``results/real_full/05_new_*.csv``). Usage:

    OMP_NUM_THREADS=1 python scripts/run_dpdl.py TASK OUT_PREFIX SEEDS M_VALUES METHODS [EPOCHS] [SETTING]

e.g. ``scripts/run_dpdl.py elpv results/elpv/05_pilot 0 10 dpdl,dra,"w/o DPL"``;
``scripts/run_dpdl.py --merge OUT.csv A_runs.csv B_runs.csv ...`` concatenates runs files into one table;
``--compare OUT.csv A_runs.csv ...`` joins runs of different configurations (fine-tuning, size, device).

Environment: ``TAIL=1 TAIL_LAYER=features.18`` fine-tunes that backbone block on cached ``TAIL_INPUT``
(default ``features.17``) activations; ``TAIL=1 TAIL_INPUT=input`` fine-tunes the whole network up to the
deep tap end to end on cached normalised images; ``DEVICE=cuda`` trains and caches on the GPU; ``THREADS``
sets the CPU threads (1); ``DATA_ROOT`` replaces the profile's data root; ``IMAGE_SIZE`` overrides the
profile's ``dpdl.image_size``. Method names: any of
lib.dpdl.baselines.METHODS, or the DPDL variants below. Settings are the profile's (``elpv`` for elpv,
``real_full`` otherwise; ``PROFILE=real_full`` for the uncapped ELPV) unless given.
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
from lib.common.utils import read_csv, write_csv
from lib.dpdl import baselines, features, protocol
from lib.dpdl import model as dpdl
from lib.experiments import profiles

VARIANTS = {"w/o DPL": dict(use_dpl=False), "w/o DFL": dict(use_dfl=False), "M_r": dict(heads=("r",)),
            "M_n + M_r": dict(heads=("n", "r")), "M_a + M_r": dict(heads=("a", "r")),
            "literal M_r": dict(residual="bridge"), "bridge DPL": dict(dpl_form="bridge"),
            "M_a": dict(heads=("a",)), "M_a + M_n": dict(heads=("a", "n"))}


def main(task_name, prefix, seeds, m_values, methods, epochs=None, setting="general"):
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
        write_csv(runs, f"{prefix}_runs.csv")
        print(f"seed {split.seed}: " + ", ".join(f"{m} {a:.3f}" for m, a in zip(part["method"], part["auroc"])),
              f"({time.time() - start:.0f} s)", flush=True)
    table = protocol.aggregate_runs(runs, ["task", "setting", "n_anomalies", "method"])
    write_csv(table, f"{prefix}.csv")
    print(table.to_string(), f"\n{time.time() - start:.0f} s")


def merge(out, *files):
    """Concatenate per-dataset ``*_runs.csv`` files into ``out`` (one table for the README), a later file's
    rows replacing an earlier one's with the same task, setting, seen class, M, method and seed; and write
    ``<out>_dpdl_paired.csv``: DPDL minus each baseline per cell, paired by seed (mean, std, seeds), with
    the per-seed differences in ``<out>_dpdl_paired_seeds.csv``."""
    import pandas as pd

    keys = ["task", "setting", "seen_class", "n_anomalies", "method", "seed"]
    runs = pd.concat([read_csv(f) for f in files], ignore_index=True)  # with their timings
    runs = runs.drop_duplicates(subset=[k for k in keys if k in runs], keep="last")
    write_csv(runs, out)
    print(f"{out}: {len(runs)} runs from {len(files)} files")
    cell = [k for k in keys[:4] if k in runs]
    wide = runs.pivot_table(index=cell + ["seed"], columns="method", values="auroc")
    rows, per_seed = [], []
    for base in [m for m in wide.columns if m != "dpdl"]:
        diff = (wide["dpdl"] - wide[base]).dropna()  # paired by seed
        per_seed.append(diff.rename("dpdl_minus").reset_index().assign(baseline=base))
        for key, g in diff.groupby(level=cell):
            rows.append(dict(zip(cell, key), baseline=base, dpdl_minus=g.mean(), std=g.std(ddof=1), seeds=len(g)))
    paired = Path(out).with_name(Path(out).stem + "_dpdl_paired.csv")
    write_csv(pd.DataFrame(rows), paired)
    write_csv(pd.concat(per_seed, ignore_index=True), paired.with_name(paired.stem + "_seeds.csv"))
    print(f"{paired} (and _seeds): DPDL minus each baseline, paired by seed")


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
    if sys.argv[1:2] == ["--merge"]:
        merge(*sys.argv[2:])
    elif sys.argv[1:2] == ["--compare"]:
        compare(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
