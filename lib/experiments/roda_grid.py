"""RoDA experiment glue: configs from the profile, adapt-then-score runs, grids with resumable CSVs,
per-epoch curves, the Fig. 5a census, the open-choice sweep, and the bank's coverage weights.

The algorithm lives in :mod:`lib.roda.adaptation` (the loop), :mod:`lib.roda.alignment` (the losses) and
:mod:`lib.ot.sinkhorn` / :mod:`lib.ot.transport` (the OT); this module only wires them to the data
(:mod:`lib.experiments.roda_steps`) and the profiles. Notebooks 03, 04 and 08 call these functions and hold no loops.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.common.corruptions import stage_of
from lib.common.data import DataError, make_loader
from lib.common.utils import progress, read_csv, torch_save, write_csv
from lib.experiments.roda_steps import (
    bank_path,
    dataset,
    evaluate,
    fit_or_load_bank,
    resolve_task,
    target_split,
)
from lib.roda.adaptation import (
    NEEDS_BN_REFERENCE,
    AdaptationDiverged,
    AdaptConfig,
    adapt,
    anomalous_patches,
    augment_batch,
    bn_state,
    restore_bn_state,
    save_bn_state,
)
from lib.roda.alignment import roda_loss
from lib.roda.bn_stats import bn_input_moments
from lib.roda.patchcore import coverage_counts

#: profile ``roda`` keys that become loss options of the OT methods
OT_LOSS_KEYS = {"roda": ("eps", "cost", "cost_norm", "rule"), "continuous_ot": ("eps", "cost", "cost_norm")}


# ----------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------


def config_from_profile(cfg, method: str, seed: int = 0, **overrides) -> AdaptConfig:
    """An :class:`AdaptConfig` from the profile's ``roda`` section (loss options for the OT methods).

    ``overrides`` may hold ``loss=dict(...)`` (merged into the loss options), ``roda=dict(...)`` (profile
    values) and any :class:`AdaptConfig` field."""
    r = copy.deepcopy(dict(cfg["roda"]))
    r.update(overrides.pop("roda", {}))
    spec = copy.deepcopy(dict((r.get("method_defaults") or {}).get(method, {})))
    loss = {k: r[k] for k in OT_LOSS_KEYS.get(method, ())}
    loss.update(spec.pop("loss", {}))
    loss.update(overrides.pop("loss", {}))
    fields = dict(epochs=r["epochs"], lr=r["lr"], momentum=r["momentum"], batch_size=r["batch_size"],
                  augment=r["augment"], bn_mode=r["bn_mode"], bn_init=r["bn_init"])
    fields.update(spec)
    fields.update(overrides)
    return AdaptConfig(method=method, seed=seed, loss=loss, **fields)


def method_specs(cfg) -> dict:
    """Name -> spec (``method`` plus overrides) of every method of notebook 03's table: the profile's
    ``roda.methods`` and its named ``roda.variants`` (e.g. ``roda_robust``)."""
    specs = {m: dict(method=m) for m in cfg["roda"]["methods"]}
    specs.update({name: copy.deepcopy(dict(spec)) for name, spec in (cfg["roda"].get("variants") or {}).items()})
    return specs


def config_for(cfg, spec: dict, seed: int) -> AdaptConfig:
    spec = copy.deepcopy(dict(spec))
    return config_from_profile(cfg, spec.pop("method"), seed=seed, **spec)


# ----------------------------------------------------------------------------------------------------
# bank coverage weights
# ----------------------------------------------------------------------------------------------------


def _beside_bank(cfg, task, model, seed: int, suffix: str, compute, use_cache: bool = True):
    """``compute()``, cached beside the task's bank (``*<suffix>``) with the bank's size and first rows, so a
    file written for another bank or backbone is recomputed, never reused."""
    path = bank_path(cfg, task, model.extractor.name, seed).with_suffix(suffix)
    head, size = model.bank[:4].cpu(), model.bank.shape[0]
    if use_cache and path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if "value" in blob and blob.get("bank_size") == size and torch.allclose(blob["bank_head"], head):
            return blob["value"]
    value = compute()
    torch_save(dict(value=value, bank_size=size, bank_head=head), path)
    return value


def _training_loader(cfg, task):
    return make_loader(dataset(task, task.train), batch_size=cfg["patchcore"]["batch_size"])


def bank_weights(cfg, task, model, seed: int = 0, use_cache: bool = True) -> torch.Tensor:
    """The coverage counts of ``model.bank`` over the task's training patches, cached beside the bank
    (``*.weights.pt``)."""
    def compute():
        feats = model.embed_loader(_training_loader(cfg, task), desc="bank weights")
        return coverage_counts(feats.reshape(-1, feats.shape[-1]).to(model.bank.device), model.bank)

    return _beside_bank(cfg, task, model, seed, ".weights.pt", compute, use_cache)


def training_bn_moments(cfg, task, model, seed: int = 0, use_cache: bool = True) -> list:
    """The BatchNorm input moments of the task's clean training images under the source state (the
    reference of ``bn_init="matched"``, :func:`lib.roda.bn_stats.bn_input_moments`), cached beside the bank
    (``*.bnref.pt``)."""
    return _beside_bank(cfg, task, model, seed, ".bnref.pt",
                        lambda: bn_input_moments(model, _training_loader(cfg, task)), use_cache)


# ----------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------


def adapt_and_evaluate(model, task, adapt_samples, eval_samples, corruption, severity, config: AdaptConfig,
                       eval_seed: int = 0, batch_size: int = 16, restore: bool = True, keep_maps: bool = False,
                       bn_file=None, weights=None, on_epoch_end=None, bn_reference=None) -> tuple[dict, pd.DataFrame]:
    """Adapt on ``adapt_samples``, score ``eval_samples`` (both shifted by ``corruption``), then restore
    the source BatchNorm state (unless ``restore=False``). ``method="patchcore"`` skips adaptation."""
    if not eval_samples:
        raise DataError("the evaluation split is empty: lower corruption.adapt_fraction")
    source = bn_state(model.extractor)
    t0 = time.perf_counter()
    history = pd.DataFrame()
    try:
        if config.method != "patchcore" or config.bn_init != "source":
            try:
                history = adapt(model, dataset(task, adapt_samples, corruption, severity, eval_seed), config,
                                show_progress=False, bank_weights=weights, on_epoch_end=on_epoch_end,
                                bn_reference=bn_reference)
            except AdaptationDiverged as err:
                # a diverged run is a result too: recorded as NaN with the reason, not silently dropped
                return dict(image_auroc=float("nan"), pixel_auroc=float("nan"), diverged=str(err),
                            adapt_seconds=time.perf_counter() - t0, steps=0, epochs_run=0), history
            if bn_file is not None:
                save_bn_state(model.extractor, bn_file, info=asdict(config))
        adapt_seconds = time.perf_counter() - t0
        res = evaluate(model, task, eval_samples, corruption, severity, eval_seed, batch_size, keep_maps=keep_maps)
    finally:
        if restore:
            restore_bn_state(model.extractor, source)
    epochs_run = int(history.epoch.max()) + 1 if len(history) else 0
    res.update(adapt_seconds=adapt_seconds, steps=len(history), epochs_run=epochs_run, diverged="")
    return res, history


def _needs_weights(config: AdaptConfig) -> bool:
    return config.loss.get("weights") == "coverage"


def run_grid(cfg, extractor, tasks, corruptions, methods: dict, seeds, out_csv, bank_seed: int | None = None,
             history_csv=None, note: str = "", resume: bool = True) -> pd.DataFrame:
    """Every (task, seed, corruption, method) run, appended to ``out_csv`` as it finishes; with ``resume``,
    rows already in ``out_csv`` (same task, backbone, method, condition, seed, severity and corruption stage) are
    skipped,
    so a stopped grid resumes (``resume=False`` starts both files afresh). Every row records its ``stage``
    (``corruption.stage``); rows of a table written before the stage existed were measured at ``"working"``.

    ``bank_seed``: one bank per task (built with that coreset seed) reused across seeds, instead of one
    bank per seed (the seed then changes the split and the augmentation draws only); recorded per row."""
    out_csv = Path(out_csv)
    if not resume:
        for f in (out_csv, history_csv):
            if f is not None and Path(f).exists():
                Path(f).unlink()
    done = read_csv(out_csv) if out_csv.exists() else pd.DataFrame()  # with its finished rows' timings
    severity, stage = cfg["corruption"]["severity"], cfg["corruption"]["stage"]
    if len(done):
        done = done.assign(stage=stage_of(done))
    if len(done):
        same = (done.severity == severity) & (done.stage == stage)
        if "backbone" in done:
            same &= done.backbone == extractor.name
        mine = done[same]
    else:
        mine = done
    key = set(zip(mine.task, mine.method, mine.condition, mine.seed)) if len(mine) else set()
    rows = [done] if len(done) else []
    for task_name in tasks:
        t = resolve_task(cfg, task_name)
        for s in seeds:
            todo = [(c, n) for c in corruptions for n in methods if (task_name, n, c, s) not in key]
            if not todo:
                continue
            a_split, e_split = target_split(t, cfg["corruption"]["adapt_fraction"], s)
            b_seed = s if bank_seed is None else bank_seed
            model, _ = fit_or_load_bank(cfg, t, extractor, seed=b_seed)
            weights = reference = None
            for c, name in progress(todo, desc=f"{task_name} s{s}"):
                conf = config_for(cfg, methods[name], s)
                if _needs_weights(conf) and weights is None:
                    weights = bank_weights(cfg, t, model, seed=b_seed)
                if conf.bn_init in NEEDS_BN_REFERENCE and reference is None:
                    reference = training_bn_moments(cfg, t, model, seed=b_seed)
                res, hist = adapt_and_evaluate(model, t, a_split, e_split, c, severity, conf, eval_seed=s,
                                               batch_size=cfg["patchcore"]["batch_size"], weights=weights,
                                               bn_reference=reference)
                row = dict(task=task_name, backbone=extractor.name, method=name, condition=c, severity=severity,
                           stage=t.stage, seed=s, bank_seed=b_seed, image_auroc=res["image_auroc"],
                           pixel_auroc=res["pixel_auroc"],
                           adapt_seconds=round(res["adapt_seconds"], 1), steps=res["steps"],
                           epochs_run=res["epochs_run"], diverged=res["diverged"], note=note)
                for k in ("eps_cost", "rho_cost", "share_row_argmax_nn", "nn_distance", "sinkhorn_iters"):
                    if k in hist:
                        row[k] = float(hist[k].iloc[-1])
                if conf.bn_init == "gated":  # the gate's choice and the two distances it compared
                    row.update({k: hist.attrs.get(k) for k in ("bn_start", "nn_source", "nn_matched")})
                rows.append(pd.DataFrame([row]))
                write_csv(pd.concat(rows, ignore_index=True), out_csv)
                if history_csv is not None and len(hist):
                    h = hist.assign(task=task_name, backbone=extractor.name, method=name, condition=c, seed=s,
                                    severity=severity, stage=stage)
                    old = pd.read_csv(history_csv) if Path(history_csv).exists() else None
                    write_csv(pd.concat([old, h], ignore_index=True) if old is not None else h, history_csv)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def epoch_curve(cfg, extractor, task_name, corruption, spec: dict, seed: int = 0, epochs: int | None = None,
                bank_seed: int | None = None) -> pd.DataFrame:
    """Image and pixel AUROC on the evaluation split after every epoch of one run, with the stopping rule
    switched off (the epoch it would have stopped at is recorded in ``stop_epoch``). Epoch 0 is the state
    the alignment starts from: the source encoder, or the re-estimated BatchNorm statistics of ``bn_init``."""
    t = resolve_task(cfg, task_name)
    severity = cfg["corruption"]["severity"]
    a_split, e_split = target_split(t, cfg["corruption"]["adapt_fraction"], seed)
    b_seed = seed if bank_seed is None else bank_seed
    model, _ = fit_or_load_bank(cfg, t, extractor, seed=b_seed)
    conf = config_for(cfg, spec, seed)
    stop_rule, start = conf.stop, conf.bn_init
    conf = replace(conf, stop=None, epochs=conf.epochs if epochs is None else epochs)
    weights = bank_weights(cfg, t, model, seed=b_seed) if _needs_weights(conf) else None
    reference = training_bn_moments(cfg, t, model, seed=b_seed) if conf.bn_init in NEEDS_BN_REFERENCE else None
    target = dataset(t, a_split, corruption, severity, seed)

    def scored():
        return evaluate(model, t, e_split, corruption, severity, seed, cfg["patchcore"]["batch_size"])

    base, rows = scored(), []

    def score(epoch, history):
        res = scored()
        nn = [h["nn_distance"] for h in history if h["epoch"] == epoch]
        rows.append(dict(epoch=epoch + 1, image_auroc=res["image_auroc"], pixel_auroc=res["pixel_auroc"],
                         nn_distance=float(np.mean(nn)) if nn else np.nan))

    source = bn_state(extractor)
    try:
        if conf.bn_init != "source":  # epoch 0 = the statistics the alignment starts from (what adapt sets first)
            stats = adapt(model, target, replace(conf, method="patchcore"), show_progress=False, bn_reference=reference)
            start = stats.attrs.get("bn_start", start)  # "gated": the statistics its gate kept
            conf = replace(conf, bn_init="source")
            score(-1, [])
        else:
            rows.append(dict(epoch=0, image_auroc=base["image_auroc"], pixel_auroc=base["pixel_auroc"],
                             nn_distance=np.nan))
        adapt(model, target, conf, show_progress=False, bank_weights=weights, on_epoch_end=score)
    finally:
        restore_bn_state(extractor, source)
    out = pd.DataFrame(rows).assign(task=task_name, condition=corruption, seed=seed, stage=t.stage, start=start,
                                    source_image_auroc=base["image_auroc"], source_pixel_auroc=base["pixel_auroc"])
    for col in ("image_auroc", "pixel_auroc", "source_image_auroc", "source_pixel_auroc"):
        out[col] = pd.to_numeric(out[col], errors="coerce")  # None (a task without masks) -> NaN, plottable
    out["stop_epoch"] = stop_epoch(out.nn_distance.to_numpy()[1:], **(stop_rule or {}))
    return out


def stop_epoch(epoch_nn, rel_tol: float = 0.01, min_epochs: int = 2) -> int:
    """The epoch (1-based) at which :class:`AdaptConfig`'s ``stop`` rule ends a run, from its per-epoch mean
    nearest-bank distances (the rule of :func:`lib.roda.adaptation.adapt`, replayed)."""
    for e in range(1, len(epoch_nn)):
        if e + 1 >= min_epochs and epoch_nn[e - 1] - epoch_nn[e] < rel_tol * abs(epoch_nn[e - 1]):
            return e + 1
    return len(epoch_nn)


def summarise(table: pd.DataFrame, shortcut: pd.DataFrame | None = None, threshold: float = 0.7) -> pd.DataFrame:
    """Mean and std over seeds per (task, condition, method), image and pixel AUROC, with the shortcut flag:
    the task's shortcut AUROC (notebook 01: the larger of the mean-grey-level and contrast folded AUROCs of
    its test split) above ``threshold`` means its image AUROC is not to be trusted (read pixel AUROC)."""
    g = table.groupby(["task", "condition", "method"])
    out = g.agg(image_mean=("image_auroc", "mean"), image_std=("image_auroc", "std"),
                pixel_mean=("pixel_auroc", "mean"), pixel_std=("pixel_auroc", "std"),
                n_seeds=("seed", "nunique")).reset_index()
    out["shortcut_auroc"] = float("nan")
    if shortcut is not None and len(shortcut):
        cols = [c for c in ("shortcut_auroc", "mean_grey_auroc", "contrast_auroc") if c in shortcut]
        best = shortcut.set_index("task")[cols].max(axis=1)  # the strongest global-intensity cue
        out["shortcut_auroc"] = out.task.map(best)
    out["image_shortcut_flag"] = out.shortcut_auroc > threshold
    return out


def versus_reference(table: pd.DataFrame, reference: str = "patchcore", margin: float = 0.0) -> pd.DataFrame:
    """Per method, against ``reference`` (no adaptation) over the (task, condition) cells both ran: how many
    cells, in how many the difference of pixel / image AUROC (paired by seed, then averaged over the seeds
    both ran) is above ``margin``, how many below ``-margin``, the mean, std over cells and the worst cell's
    difference; ``seeds`` and ``*_seed_std``: how many seeds, and the std over seeds of each seed's mean
    difference over its cells (how much the mean effect moves with the seed). The counts a README sentence
    cites."""
    keys = ["task", "condition", "seed"]
    ref = table[table.method == reference].groupby(keys)[["image_auroc", "pixel_auroc"]].mean()
    rows = []
    for method, g in table[table.method != reference].groupby("method", sort=False):
        g = g.groupby(keys)[["image_auroc", "pixel_auroc"]].mean().join(ref.add_suffix("_ref"), how="inner")
        cell = g.groupby(["task", "condition"]).mean()  # paired by seed, then averaged per cell
        per_seed = g.groupby("seed").mean()  # each seed's mean over its cells
        row = dict(method=method, reference=reference, cells=len(cell), seeds=len(per_seed))
        for metric in ("pixel_auroc", "image_auroc"):
            d = cell[metric] - cell[f"{metric}_ref"]
            name = metric.split("_")[0]
            row.update({f"{name}_above": int((d > margin).sum()), f"{name}_below": int((d < -margin).sum()),
                        f"{name}_mean_diff": float(d.mean()), f"{name}_std_diff": float(d.std(ddof=1)),
                        f"{name}_worst_diff": float(d.min()),
                        f"{name}_seed_std": float((per_seed[metric] - per_seed[f"{metric}_ref"]).std(ddof=1))})
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# Fig. 5a and the open choices (notebook 04)
# ----------------------------------------------------------------------------------------------------


def assignment_census(model, dataset, augment: str, eps: float, rule: str = "or", seed: int = 0,
                      batch_size: int = 10, cost: str = "l2", cost_norm: str = "mean",
                      anomalous_patch_fraction: float = 0.5) -> dict:
    """RoDA Fig. 5a: in one target batch, how many anomalous patches does the discrete plan assign?

    The batch is augmented with ``augment``; the plan is solved against the bank with the current
    encoder; only the patches of the *original* images are counted, and a patch counts as assigned when
    it is the column argmax of some bank entry (see :func:`lib.ot.transport.assignment_stats`)."""
    generator = torch.Generator().manual_seed(seed)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=True, seed=seed)
    batch = None
    for candidate in loader:  # the first batch that holds a defect (else the first batch)
        batch = batch if batch is not None else candidate
        if candidate["mask"].any():
            batch = candidate
            break
    images, masks = augment_batch(batch["image"], batch["mask"], augment, generator)
    with torch.no_grad():
        target = model.embed(images).reshape(-1, model.bank.shape[1])
        anomalous = anomalous_patches(masks, model.grid, anomalous_patch_fraction)
        n_original = batch["image"].shape[0] * model.grid[0] * model.grid[1]
        anomalous[n_original:] = False  # count the original images' patches only
        _, stats = roda_loss(target, model.bank, eps=eps, cost=cost, cost_norm=cost_norm, rule=rule,
                             anomalous_rows=anomalous.to(target.device))
    n_anom = int(anomalous.sum())
    n_assigned = int(stats.get("n_anomalous_col_argmax") or 0)
    return dict(augment=augment, n_images=int(batch["image"].shape[0]), n_target_patches=target.shape[0],
                n_anomalous_patches=n_anom, n_assigned=n_assigned,
                share_assigned=n_assigned / n_anom if n_anom else float("nan"))


def open_choices(cfg) -> dict:
    """The open choices of RoDA, one at a time away from the profile's defaults (notebook 04)."""
    r, abl = cfg["roda"], cfg["ablation"]
    choices = {"default": {}}
    choices.update({f"eps={e}": dict(loss=dict(eps=e)) for e in abl["eps_grid"] if e != r["eps"]})
    choices.update({f"epochs={e}": dict(epochs=e) for e in abl["epochs_grid"] if e != r["epochs"]})
    choices.update({f"lr={lr}": dict(lr=lr) for lr in abl.get("lr_grid", ()) if lr != r["lr"]})
    choices.update({"rule=and": dict(loss=dict(rule="and")), "bn_mode=train": dict(bn_mode="train"),
                    "cost=sqeuclidean": dict(loss=dict(cost="sqeuclidean")),
                    "cost_norm=max": dict(loss=dict(cost_norm="max")), "augment=none": dict(augment="none")})
    return choices


def choice_sweep(cfg, model, task, corruptions, seed: int = 0, choices: dict | None = None) -> pd.DataFrame:
    """RoDA under each open choice: AUROC on the 20% adaptation split (what one may tune on: unlabeled
    during adaptation, labels read only to score) and on the 80% evaluation split."""
    choices = choices or open_choices(cfg)
    severity = cfg["corruption"]["severity"]
    a_split, e_split = target_split(task, cfg["corruption"]["adapt_fraction"], seed)
    rows = []
    for c, name in progress([(c, k) for c in corruptions for k in choices], desc="choices"):
        conf = config_from_profile(cfg, "roda", seed=seed, **copy.deepcopy(choices[name]))
        source = bn_state(model.extractor)
        try:
            adapt(model, dataset(task, a_split, c, severity, seed), conf, show_progress=False)
            on_adapt = evaluate(model, task, a_split, c, severity, seed)
            on_eval = evaluate(model, task, e_split, c, severity, seed)
        except AdaptationDiverged:  # a diverged setting is a result (NaN), as in adapt_and_evaluate
            on_adapt = on_eval = dict(image_auroc=float("nan"))
        finally:
            restore_bn_state(model.extractor, source)
        rows.append(dict(task=task.name, choice=name, condition=c, seed=seed,
                         adapt_split_auroc=on_adapt["image_auroc"], eval_split_auroc=on_eval["image_auroc"]))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# notebook 08: what one plan looks like under each configuration
# ----------------------------------------------------------------------------------------------------


def first_batch_diagnostics(cfg, model, task, corruption, specs: dict, seed: int = 0, weights=None) -> pd.DataFrame:
    """One augmented adaptation batch (source encoder), one plan per configuration: how peaked the plan is
    (entries per row), how often a row's plan argmax is its nearest bank entry, Sinkhorn iterations, pairs
    kept and, where masks exist, the share of anomalous vs. normal target patches kept (masks are read to
    report, never to choose)."""
    from lib.ot.epsilon import entries_per_row
    from lib.roda.adaptation import resolve_loss_options

    severity = cfg["corruption"]["severity"]
    a_split, _ = target_split(task, cfg["corruption"]["adapt_fraction"], seed)
    ds = dataset(task, a_split, corruption, severity, seed)
    rows = []
    for name, spec in specs.items():
        conf = config_for(cfg, spec, seed)
        if conf.method != "roda":
            continue
        batch = next(iter(make_loader(ds, batch_size=conf.batch_size, shuffle=True, seed=seed)))
        images, masks = augment_batch(batch["image"], batch["mask"], conf.augment, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            target = model.embed(images).reshape(-1, model.bank.shape[1])
            opts = resolve_loss_options(conf.loss, target, model.bank, weights)
            resolved = opts.pop("resolved")
            anomalous = anomalous_patches(masks, model.grid, conf.anomalous_patch_fraction) if masks.any() else None
            _, info = roda_loss(target, model.bank, anomalous_rows=anomalous, return_plan=True, **opts)
        spread = float(entries_per_row(info["plan"].clamp_min(1e-30).log()).mean())
        row_mass = info["plan"].sum(1) * target.shape[0]
        out = dict(config=name, condition=corruption, seed=seed, n_rows=info["n_rows"], n_pairs=info["n_pairs"],
                   entries_per_row=spread, share_row_argmax_nn=info["share_row_argmax_nn"],
                   sinkhorn_iters=info["sinkhorn_iters"], eps_cost=info["eps_cost"],
                   rho_cost=resolved.get("rho_cost", float("nan")),
                   share_rows_kept=info["pairs"].rows.unique().numel() / info["n_rows"])
        if anomalous is not None:
            out.update(share_anomalous_kept=info["share_anomalous_kept"], share_normal_kept=info["share_normal_kept"],
                       row_mass_anomalous=float(row_mass[anomalous].mean()),
                       row_mass_normal=float(row_mass[~anomalous].mean()))
        rows.append(out)
        del info
    return pd.DataFrame(rows)
