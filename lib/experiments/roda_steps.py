"""The few steps every RoDA notebook repeats: resolve a task for a profile, build (or load) its bank,
split the shifted target set, score a split under a corruption. Notebooks call these; they hold no loops.

Banks are cached under the profile's cache folder with a key of everything that built them
(:func:`bank_key`); shifted images are shared in memory by every method of a run (:data:`lib.common.cache.IMAGES`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from lib.common import cache
from lib.common.data import AnomalyDataset, Task, load_task, make_loader, stratified_split, subsample
from lib.common.metrics import image_auroc, pixel_auroc
from lib.experiments.profiles import data_root_for
from lib.roda.patchcore import BANK_FORMAT, BankError, PatchCore


def resolve_task(cfg, name: str) -> Task:
    """The task ``name`` under the profile: its data root, caps on train/test size, geometry, corruption stage."""
    task = load_task(name, data_root_for(cfg, name))
    pc = cfg["patchcore"]
    train = subsample(task.train, pc.get("max_train"), seed=0)
    test = subsample(task.test, pc.get("max_test"), seed=0)
    geometry = cfg.get("geometry") or task.geometry()
    return replace(task, train=tuple(train), test=tuple(test), stage=cfg["corruption"]["stage"], **geometry)


def target_split(task: Task, fraction: float, seed: int):
    """RoDA's split of the (shifted) target set: ``fraction`` to adapt on, the rest to evaluate.

    Stratified by label and deterministic in ``seed``; returns two lists of samples."""
    adapt_idx, eval_idx = stratified_split([s.label for s in task.test], fraction, seed)
    test = list(task.test)
    return [test[i] for i in adapt_idx], [test[i] for i in eval_idx]


def dataset(task: Task, samples, corruption=None, severity=5, seed=0, use_cache: bool = True) -> AnomalyDataset:
    """``samples`` of ``task`` at its geometry, shifted by ``corruption``; preprocessed images are shared
    through :data:`lib.common.cache.IMAGES` (keyed by file, geometry, corruption, severity, seed and the task's
    corruption stage: the same pixels as recomputing them)."""
    return AnomalyDataset(samples, corruption=corruption, severity=severity, seed=seed,
                          cache=cache.IMAGES if use_cache else None, stage=task.stage, native=task.native,
                          **task.geometry())


def bank_path(cfg, task: Task, backbone: str, seed: int) -> Path:
    safe = task.name.strip("/").replace("/", "-")
    return Path(cfg["cache_dir"]) / f"bank_{safe}_{backbone}_s{seed}.pt"


def bank_key(model: PatchCore, task: Task) -> str:
    """Cache key of a bank: the training files (paths, sizes, mtimes: so the data root too), the geometry,
    the backbone (name, taps, normalisation, weights digest), every PatchCore setting and the device type."""
    return cache.content_key(
        kind=BANK_FORMAT, task=task.name, train=cache.samples_fingerprint(task.train), geometry=task.geometry(),
        backbone=cache.extractor_fingerprint(model.extractor),
        patchcore=dict(coreset_ratio=model.coreset_ratio, max_bank=model.max_bank, pretrain_dim=model.pretrain_dim,
                       target_dim=model.target_dim, patch_size=model.patch_size, proj_dim=model.proj_dim,
                       n_starts=model.n_starts, smoothing_sigma=model.smoothing_sigma, seed=model.seed),
        device=model.device.type)


def features_key(model: PatchCore, task: Task, samples, corruption=None, severity=5, seed=0) -> str:
    """Cache key of the patch features of ``samples`` under a shift (for :func:`lib.common.cache.cached`): the files,
    the geometry, the shift (with the task's corruption stage), the backbone with its current weights (so adapted
    BatchNorm parameters give another key) and the aggregation settings."""
    shifted = bool(corruption) and corruption != "clean" and severity != 0
    return cache.content_key(
        kind="patch-features/1", files=cache.samples_fingerprint(samples), geometry=task.geometry(),
        shift=[corruption, severity, seed, task.stage, task.native] if shifted else None,
        backbone=cache.extractor_fingerprint(model.extractor),
        dims=[model.pretrain_dim, model.target_dim, model.patch_size], device=model.device.type)


def fit_or_load_bank(cfg, task: Task, extractor, seed: int = 0, use_cache: bool = True):
    """PatchCore bank for ``task``; cached under the profile's cache folder and reused only when its
    :func:`bank_key` matches (else rebuilt, and the reason printed).

    Returns (model, info) with the bank size, the seconds taken and whether the cache was used."""
    path = bank_path(cfg, task, extractor.name, seed)
    pc = cfg["patchcore"]
    t0 = time.perf_counter()
    model = PatchCore(extractor, coreset_ratio=pc["coreset_ratio"], max_bank=pc.get("max_bank"), seed=seed,
                      device=cfg["device"])
    key = bank_key(model, task)
    if use_cache and path.exists():
        try:
            model = PatchCore.load(path, extractor, device=cfg["device"], cache_key=key)
            return model, dict(bank_size=model.bank.shape[0], seconds=time.perf_counter() - t0, cached=True)
        except BankError as err:
            print(f"rebuilding the bank: {err}")
    loader = make_loader(dataset(task, task.train), batch_size=pc["batch_size"])
    model.fit(loader, preprocessing=task.geometry())
    model.save(path, cache_key=key)
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
    separates the classes (:func:`lib.common.metrics.shortcut_auroc`)."""
    ds = dataset(task, samples, corruption, severity, seed)
    rows = []
    for i, s in enumerate(samples):
        grey = ds[i]["image"].mean(0)
        rows.append(dict(label=s.label, defect=s.defect, mean=float(grey.mean()), std=float(grey.std())))
    return pd.DataFrame(rows)
