"""The few steps every RoDA notebook repeats: resolve a task for a profile, build (or load) its bank,
split the shifted target set, score a split under a corruption. Notebooks call these; they hold no loops."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .data import AnomalyDataset, Task, load_task, make_loader, stratified_split, subsample
from .metrics import image_auroc, pixel_auroc
from .patchcore import BankError, PatchCore
from .profiles import task_root


def resolve_task(cfg, name: str) -> Task:
    """The task ``name`` under the profile: its data root, caps on train/test size, geometry."""
    task = load_task(name, task_root(cfg, name))
    pc = cfg["patchcore"]
    train = subsample(task.train, pc.get("max_train"), seed=0)
    test = subsample(task.test, pc.get("max_test"), seed=0)
    geometry = cfg.get("geometry") or task.geometry()
    return replace(task, train=tuple(train), test=tuple(test), **geometry)


def target_split(task: Task, fraction: float, seed: int):
    """RoDA's split of the (shifted) target set: ``fraction`` to adapt on, the rest to evaluate.

    Stratified by label and deterministic in ``seed``; returns two lists of samples."""
    adapt_idx, eval_idx = stratified_split([s.label for s in task.test], fraction, seed)
    test = list(task.test)
    return [test[i] for i in adapt_idx], [test[i] for i in eval_idx]


def dataset(task: Task, samples, corruption=None, severity=5, seed=0) -> AnomalyDataset:
    return AnomalyDataset(samples, corruption=corruption, severity=severity, seed=seed, **task.geometry())


def bank_path(cfg, task: Task, backbone: str, seed: int) -> Path:
    safe = task.name.replace("/", "-")
    return Path(cfg["cache_dir"]) / f"bank_{safe}_{backbone}_s{seed}.pt"


def fit_or_load_bank(cfg, task: Task, extractor, seed: int = 0, use_cache: bool = True):
    """PatchCore bank for ``task``; cached under the profile's cache folder (rebuilt if unusable).

    Returns (model, info) with the bank size and the seconds taken."""
    path = bank_path(cfg, task, extractor.name, seed)
    pc = cfg["patchcore"]
    t0 = time.perf_counter()
    if use_cache and path.exists():
        try:
            model = PatchCore.load(path, extractor, device=cfg["device"])
            return model, dict(bank_size=model.bank.shape[0], seconds=time.perf_counter() - t0, cached=True)
        except BankError:
            path.unlink()
    model = PatchCore(extractor, coreset_ratio=pc["coreset_ratio"], max_bank=pc.get("max_bank"), seed=seed,
                      device=cfg["device"])
    loader = make_loader(dataset(task, task.train), batch_size=pc["batch_size"])
    model.fit(loader, preprocessing=task.geometry())
    model.save(path)
    return model, dict(bank_size=model.bank.shape[0], seconds=time.perf_counter() - t0, cached=False)


def evaluate(model: PatchCore, task: Task, samples, corruption=None, severity=5, seed=0, batch_size=16,
             keep_maps: bool = False) -> dict:
    """Image AUROC (and pixel AUROC where masks exist) of ``model`` on ``samples`` under a corruption."""
    t0 = time.perf_counter()
    loader = make_loader(dataset(task, samples, corruption, severity, seed), batch_size=batch_size)
    out = model.predict(loader, desc=f"score {corruption or 'clean'}", keep_maps=True)
    res = dict(image_auroc=image_auroc(out["labels"], out["scores"]), n_images=len(samples),
               n_anomalous=int(np.sum(out["labels"])))
    res["pixel_auroc"] = pixel_auroc(out["masks"], out["maps"]) if out["masks"].any() else float("nan")
    res["seconds"] = time.perf_counter() - t0
    if keep_maps:
        res["output"] = out
    return res


def image_statistics(task: Task, samples, corruption=None, severity=5, seed=0):
    """Per image of ``samples`` (preprocessed as the model sees them): label, defect, mean grey level
    and grey-level std (contrast). Notebook 01 checks with them whether global intensity alone
    separates the classes (:func:`lib.metrics.shortcut_auroc`)."""
    ds = dataset(task, samples, corruption, severity, seed)
    rows = []
    for i, s in enumerate(samples):
        grey = ds[i]["image"].mean(0)
        rows.append(dict(label=s.label, defect=s.defect, mean=float(grey.mean()), std=float(grey.std())))
    return pd.DataFrame(rows)
