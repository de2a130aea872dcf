"""Test-time adaptation of the encoder's BatchNorm affine parameters (RoDA Sec. 3.4, Algorithm 1).

For every minibatch B_t of the (unlabeled, shifted) adaptation split::

    B~_t = T(B_t)                                   augment (flips, 90-degree rotations; Sec. 3.3)
    Z    = f(B~_t; Theta)                           patch features, N_tp = |B~_t| * N_p rows
    C_ij = ||z_i - m_j||                            cost to the fixed source bank M (Sec. 3.2)
    gamma* = argmin <gamma, C> + eps H(gamma)       entropic OT, uniform marginals (Eq. 5)
    pi*  = discretize(gamma*)                       robust Sinkhorn rule (Eq. 6)
    Theta_bn <- Theta_bn - lr * grad sum_ij pi*_ij C_ij

Only the BatchNorm ``weight``/``bias`` of the modules the taps depend on are trainable; the plan is not
differentiated (envelope gradient). The bank stays the source bank; after adaptation only target
features are recomputed. The same loop runs every alignment baseline (``method`` selects the loss
from :data:`lib.roda.alignment.ALIGNMENT_LOSSES`).

Open choices (the paper is silent; each is a parameter, measured in notebooks 03/04):

* ``bn_mode``: ``"eval"`` keeps the source running statistics (only the affine parameters move);
  ``"train"`` normalises with batch statistics while adapting and updates the running statistics,
  which are then used to score.
* ``bn_init``: ``"source"`` starts from the source BatchNorm state; ``"target"`` first re-estimates the
  running statistics on the (unlabeled) adaptation split, as AdaBN does (Li et al. 2016; Schneider et al.
  2020 for corruptions), then adapts the affine parameters against the bank with those statistics fixed.
  A contrast or brightness change is, after the first convolution, close to a per-channel affine map that
  re-normalisation undoes; the OT loss then has only the residual shift to remove. With
  ``method="patchcore"`` the re-estimation alone is run (the "AdaBN" row). ``"matched"`` re-estimates them
  *referenced to the training images* (:func:`lib.roda.bn_stats.match_bn_stats`): the target is normalised to the
  moments the clean training images have under the source statistics, not to zero mean and unit variance,
  so an unshifted target keeps the source state and the bank's feature space. ``"gated"`` keeps the matched
  statistics only if they bring the split nearer the bank (mean nearest-bank distance, no labels;
  :func:`lib.roda.bn_stats.gate_bn_stats`), else the source state; the history records which (``bn_start``).
* ``augment``: ``"none"``, ``"copy"`` (the batch twice: the "direct copy" ablation) or ``"flip_rot90"``
  (the batch plus one random flip/90-degree-rotation view of each image; non-square images such as
  KolektorSDD strips are turned by 0 or 180 degrees only). The augmentation knows nothing about the
  corruption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lib.common.data import make_loader
from lib.common.utils import all_finite, progress, torch_save
from lib.ot.epsilon import calibrate_eps
from lib.ot.transport import pairwise_cost
from lib.roda.alignment import ALIGNMENT_LOSSES, source_stats
from lib.roda.bn_stats import gate_bn_stats, match_bn_stats, reestimate_bn_stats

AUGMENTATIONS = ("none", "copy", "flip_rot90")
BN_INITS = ("source", "target", "matched", "gated")
#: the ``bn_init`` values that need the training images' BatchNorm moments (``bn_reference``)
NEEDS_BN_REFERENCE = ("matched", "gated")


class AdaptationError(ValueError):
    """Bad input to the adaptation loop; the message names the fix."""


class AdaptationDiverged(AdaptationError):
    """The encoder ran away during adaptation (non-finite features, cost scale or loss): a result of that
    setting (runners record it as NaN), not bad input."""


@dataclass
class AdaptConfig:
    """Hyper-parameters of one adaptation run (paper values as defaults where the paper gives them)."""

    method: str = "roda"
    epochs: int = 10  # paper: 10 on MVTec
    # a fixed number of optimisation steps instead of ``epochs`` (the split is cycled as often as
    # needed): notebook 04's Table 5 uses it to compare amounts of target data at equal optimisation
    steps: int | None = None
    lr: float = 0.003  # paper
    momentum: float = 0.9  # paper
    batch_size: int = 10  # paper
    augment: str = "flip_rot90"
    bn_mode: str = "eval"
    # "target": AdaBN first; "matched": AdaBN referenced to the training images; "gated": matched only if it
    # lowers the split's nearest-bank distance
    bn_init: str = "source"
    seed: int = 0
    loss: dict = field(default_factory=dict)  # forwarded to the alignment loss (eps, rule, cost, ...)
    anomalous_patch_fraction: float = 0.5  # a patch is anomalous when this share of its cell is defect
    # divide the loss by its (detached) value at the first step, as TTT++ scales its CORAL term by the
    # source value; the Gaussian-KL baseline needs it (its raw value is ~10^3-10^4 on 256-d features)
    normalize_loss: bool = False
    # drop the last, smaller minibatch of every epoch (a 2-image remainder otherwise gets a full step)
    drop_last: bool = False
    # label-free stopping rule, e.g. dict(rel_tol=0.01, min_epochs=2): stop after an epoch whose mean
    # nearest-bank distance of the (unlabeled) adaptation batches fell by less than rel_tol (relative) from
    # the epoch before; None: run all epochs
    stop: dict | None = None
    # warm-start each minibatch's Sinkhorn from the previous one's bank-side potentials (same fixed point)
    warm_start: bool = True

    def __post_init__(self):
        if self.method != "patchcore" and self.method not in ALIGNMENT_LOSSES:
            raise AdaptationError(f"unknown method {self.method!r}: choose one of {sorted(ALIGNMENT_LOSSES)}")
        if self.augment not in AUGMENTATIONS:
            raise AdaptationError(f"unknown augment {self.augment!r}: choose one of {AUGMENTATIONS}")
        if self.steps is not None and self.steps < 1:
            raise AdaptationError(f"steps must be a positive number of optimisation steps (or None), got {self.steps}")
        if self.stop is not None and not set(self.stop) <= {"rel_tol", "min_epochs"}:
            raise AdaptationError(f"stop takes rel_tol and min_epochs, got {sorted(self.stop)}")
        if self.bn_mode not in ("eval", "train"):
            raise AdaptationError(f"bn_mode must be 'eval' or 'train', got {self.bn_mode!r}")
        if self.bn_init not in BN_INITS:
            raise AdaptationError(f"bn_init must be one of {BN_INITS}, got {self.bn_init!r}")


# ----------------------------------------------------------------------------------------------------
# Target augmentation T(x)
# ----------------------------------------------------------------------------------------------------


def augment_batch(images: torch.Tensor, masks: torch.Tensor, mode: str, generator: torch.Generator):
    """Apply T to a batch (images and masks alike). Returns the enlarged batch."""
    if mode == "none":
        return images, masks
    if mode == "copy":
        return torch.cat([images, images]), torch.cat([masks, masks])
    square = images.shape[-1] == images.shape[-2]
    views, view_masks = [], []
    for img, msk in zip(images, masks):
        # 90/270-degree turns of a non-square image would change its shape: there only 0 or 180
        if square:
            k = int(torch.randint(0, 4, (1,), generator=generator))
        else:
            k = 2 * int(torch.randint(0, 2, (1,), generator=generator))
        flip_h, flip_v = torch.rand(2, generator=generator) < 0.5
        x, m = torch.rot90(img, k, dims=(1, 2)), torch.rot90(msk, k, dims=(1, 2))
        if flip_h:
            x, m = x.flip(2), m.flip(2)
        if flip_v:
            x, m = x.flip(1), m.flip(1)
        views.append(x)
        view_masks.append(m)
    return torch.cat([images, torch.stack(views)]), torch.cat([masks, torch.stack(view_masks)])


# ----------------------------------------------------------------------------------------------------
# BatchNorm state
# ----------------------------------------------------------------------------------------------------


def bn_state(extractor) -> dict:
    """Snapshot of every BatchNorm tensor the taps depend on (affine parameters and running stats)."""
    state = {}
    for i, bn in enumerate(extractor.bn_modules()):
        for key, value in bn.state_dict().items():
            state[f"{i}.{key}"] = value.detach().clone()
    return state


def restore_bn_state(extractor, state: dict) -> None:
    """Undo an adaptation: put a :func:`bn_state` snapshot back."""
    for i, bn in enumerate(extractor.bn_modules()):
        bn.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)})


def save_bn_state(extractor, path, info: dict | None = None) -> Path:
    """The adapted BatchNorm tensors in a small file (next to the bank), with the backbone identity."""
    return torch_save(dict(bn=bn_state(extractor), backbone=dict(extractor.normalization), info=info or {}), path)


def load_bn_state(extractor, path) -> dict:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if blob.get("backbone") != dict(extractor.normalization):
        raise AdaptationError(f"{path} holds BatchNorm parameters of another backbone: load {blob.get('backbone')}")
    restore_bn_state(extractor, blob["bn"])
    return blob.get("info", {})


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def anomalous_patches(masks: torch.Tensor, grid, fraction: float) -> torch.Tensor:
    """(B, 1, H, W) masks -> (B * h * w,) bool: patches whose cell is at least ``fraction`` defect."""
    cover = F.adaptive_avg_pool2d(masks.float(), tuple(grid))
    return (cover >= fraction).flatten()


#: what each loss takes beyond ``(target, bank, **config.loss)``: the Gaussian baselines read source statistics
#: (from the bank only, computed once); the OT losses take Fig. 5a masks, bank weights and a warm start
LOSS_INPUTS = {
    "roda": ("anomalous_rows", "bank_weights", "warm_start"),
    "continuous_ot": ("warm_start",),
    "hungarian": (),
    "ttt++": ("stats",),
    "ttac": ("stats",),
}

#: keys of ``config.loss`` that :func:`resolve_loss_options` turns into :func:`lib.roda.alignment.roda_loss` arguments
DATA_DRIVEN_KEYS = ("entries_per_row", "ot", "rho", "rho_std", "weights")


def is_data_driven(options: dict) -> bool:
    """Whether ``options`` hold anything :func:`resolve_loss_options` must fix on the first batch."""
    return any(k in options for k in DATA_DRIVEN_KEYS) or options.get("eps") == "auto"


def resolve_loss_options(options: dict, target: torch.Tensor, bank: torch.Tensor, bank_weights=None) -> dict:
    """Fix the data-driven OT options on the first (unlabeled) adaptation batch; returns loss kwargs.

    - ``eps="auto"`` with ``entries_per_row=K``: ``eps`` in cost units from :func:`lib.ot.epsilon.calibrate_eps`
      (rows of the plan spread over about ``K`` bank entries), with ``cost_norm="none"`` so it stays fixed;
    - ``ot="semi_relaxed"`` or ``"unbalanced"`` (both sides relaxed) with ``rho="auto"``:
      ``rho = rho_std * std_i(min_j C_ij)`` (the spread of the
      batch's nearest-bank distances, cost units): a patch ``rho`` further from the bank than the typical one
      carries ``e`` times less mass;
    - ``weights="coverage"``: column marginal proportional to ``bank_weights`` (training patches per entry;
      error when they are missing).

    Returns the options with these resolved (and ``eps_cost``/``rho_cost`` recorded under ``resolved``).
    """
    opts = dict(options)
    weights = opts.pop("weights", "uniform")
    k = opts.pop("entries_per_row", None)
    ot = opts.pop("ot", "absorb")
    rho, rho_std = opts.pop("rho", None), opts.pop("rho_std", 1.0)
    if weights not in ("uniform", "coverage"):
        raise AdaptationError(f"loss weights must be 'uniform' or 'coverage', got {weights!r}")
    if weights == "coverage":
        if bank_weights is None:
            raise AdaptationError("loss weights='coverage' needs the bank's coverage counts: pass bank_weights "
                                  "(lib.experiments.roda_grid.bank_weights computes and caches them)")
        opts["bank_weights"] = bank_weights
    b = None
    if weights == "coverage":
        w = torch.as_tensor(bank_weights, dtype=torch.float32).reshape(-1)
        if w.numel() != bank.shape[0]:
            raise AdaptationError(f"bank_weights has {w.numel()} entries but the bank has {bank.shape[0]}: "
                                  "recompute the weights for this bank (lib.experiments.roda_grid.bank_weights)")
        b = w / w.sum()
    resolved = {}
    with torch.no_grad():
        C = pairwise_cost(target.detach(), bank.detach().to(target), opts.get("cost", "l2"))
        if opts.get("eps") == "auto":
            if k is None:
                raise AdaptationError("eps='auto' needs entries_per_row (the target spread of the plan's rows)")
            try:
                opts["eps"] = calibrate_eps(C, float(k), b=b)
            except ValueError as err:
                raise AdaptationError(str(err)) from None
            opts["cost_norm"] = "none"
            resolved["eps_cost"] = opts["eps"]
        if ot not in ("absorb", "log", "semi_relaxed", "unbalanced"):
            raise AdaptationError(f"loss ot must be 'absorb', 'log', 'semi_relaxed' or 'unbalanced', got {ot!r}")
        skw = dict(opts.pop("sinkhorn_kwargs", None) or {}, method=ot)
        if ot in ("semi_relaxed", "unbalanced"):
            if rho == "auto" or rho is None:
                rho = float(rho_std) * float(C.min(1).values.std())
                if opts.get("cost_norm", "mean") != "none":
                    raise AdaptationError("rho='auto' is in cost units: use it with eps='auto' (cost_norm 'none')")
            skw["rho"] = float(rho)
            resolved["rho_cost"] = float(rho)
        opts["sinkhorn_kwargs"] = skw
    opts["resolved"] = resolved
    return opts


def _nn_distance(target: torch.Tensor, bank: torch.Tensor) -> float:
    with torch.no_grad():
        return float(pairwise_cost(target.detach(), bank.to(target)).min(1).values.mean())


def adapt(model, dataset, config: AdaptConfig, show_progress: bool = True, bank_weights=None,
          on_epoch_end=None, bn_reference=None) -> pd.DataFrame:
    """Adapt ``model.extractor``'s BatchNorm affine parameters on ``dataset`` (the adaptation split).

    ``bank_weights`` (M,) are the training patches each bank entry covers (needed by ``loss.weights =
    "coverage"``); ``bn_reference`` the training images' BatchNorm input moments
    (:func:`lib.roda.bn_stats.bn_input_moments`, needed by ``bn_init="matched"`` and ``"gated"``).
    ``on_epoch_end(epoch, history)`` is called after every epoch (e.g. to score per epoch); a ``config.stop`` rule
    may end the run early. Returns the per-step diagnostics: loss, nearest-bank distance, pairs, OT iterations
    and, where masks exist, the Fig. 5a counts of anomalous target patches; its ``attrs`` say where the alignment
    started (``bn_start``, and for ``"gated"`` the distances ``nn_source`` / ``nn_matched`` it compared).
    """
    if len(dataset) == 0:
        raise AdaptationError("the adaptation split is empty: raise corruption.adapt_fraction or add target images")
    if config.drop_last and len(dataset) < config.batch_size:
        raise AdaptationError(f"the adaptation split has {len(dataset)} images, fewer than one batch of "
                              f"{config.batch_size} with drop_last=True: lower roda.batch_size or raise "
                              "corruption.adapt_fraction")
    model._check_bank()
    if config.bn_init in NEEDS_BN_REFERENCE and bn_reference is None:
        raise AdaptationError(f"bn_init={config.bn_init!r} needs the training images' BatchNorm moments: pass "
                              "bn_reference=lib.roda.bn_stats.bn_input_moments(model, <loader of the training images>)")
    start = dict(bn_start=config.bn_init)
    if config.bn_init != "source":  # the statistics first: every image of the split once, no augmentation
        plain = make_loader(dataset, batch_size=max(config.batch_size, 2))
        if config.bn_init == "target":
            reestimate_bn_stats(model, plain)
        elif config.bn_init == "matched":
            match_bn_stats(model, plain, bn_reference)
        else:
            start = gate_bn_stats(model, plain, bn_reference)
    if config.method == "patchcore":  # no alignment loss: the statistics alone (AdaBN) or nothing
        out = pd.DataFrame()
        out.attrs.update(start)
        return out
    extractor = model.extractor
    params = list(extractor.bn_affine_parameters())
    if not params:
        raise AdaptationError(f"backbone {extractor.name} has no BatchNorm layer before its taps: nothing to adapt")
    loss_fn = ALIGNMENT_LOSSES[config.method]
    inputs = LOSS_INPUTS.get(config.method, ())
    bank = model.bank
    static = dict(config.loss)
    if "stats" in inputs:
        static["stats"] = source_stats(bank)
    needs_resolve = is_data_driven(static)
    generator = torch.Generator().manual_seed(config.seed)
    loader = make_loader(dataset, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    per_epoch = len(dataset) // config.batch_size if config.drop_last else len(loader)
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    for p in params:
        p.requires_grad_(True)
    if config.bn_mode == "train":
        for bn in extractor.bn_modules():
            bn.train()
    rows, loss_scale, warm, resolved = [], None, None, {}
    total = config.steps if config.steps is not None else config.epochs * per_epoch
    n_epochs = -(-total // per_epoch)  # enough passes over the split for ``total`` steps
    steps = progress(total=total, desc=f"adapt {config.method}", leave=False, disable=not show_progress)
    stop = {"rel_tol": 0.01, "min_epochs": 2, **config.stop} if config.stop is not None else None
    epoch_nn = []
    try:
        for epoch in range(n_epochs):
            for k, batch in enumerate(loader):
                if len(rows) == total or k >= per_epoch:
                    break
                images, masks = augment_batch(batch["image"], batch["mask"], config.augment, generator)
                with extractor.differentiable_mode():
                    feats = model.embed(images)
                if feats.shape[-1] != bank.shape[1]:
                    raise AdaptationError(f"features are {feats.shape[-1]}-d but the bank is {bank.shape[1]}-d: "
                                          "the bank was built with another backbone or aggregation; rebuild it")
                target = feats.reshape(-1, feats.shape[-1])
                if not all_finite(target):
                    raise AdaptationDiverged("NaN/inf in target features: the adaptation diverged; lower lr")
                if needs_resolve:  # data-driven options, fixed once on the first batch (no labels)
                    static = resolve_loss_options(static, target, bank, bank_weights)
                    resolved = static.pop("resolved")
                    needs_resolve = False
                extra = {}
                if "anomalous_rows" in inputs and masks.any():
                    extra["anomalous_rows"] = anomalous_patches(masks, model.grid,
                                                                config.anomalous_patch_fraction).to(target.device)
                if "warm_start" in inputs and config.warm_start and warm is not None:
                    skw = dict(static.get("sinkhorn_kwargs") or {}, init=(None, warm))
                    extra["sinkhorn_kwargs"] = skw
                call = {**static, **extra}
                try:
                    loss, info = loss_fn(target, bank, **call)
                except FloatingPointError as err:
                    raise AdaptationDiverged(f"{err} at step {len(rows)}: the adaptation diverged; lower lr") from err
                if "potentials" in info:
                    warm = info["potentials"][1]
                if not torch.isfinite(loss):
                    raise AdaptationDiverged(f"{config.method} loss is {float(loss)} at step {len(rows)}: the "
                                             "adaptation diverged; lower lr or set normalize_loss=True")
                if config.normalize_loss:
                    if loss_scale is None:
                        loss_scale = float(loss.detach()) or 1.0
                    loss = loss / loss_scale
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                nn_d = info["nn_distance"] if "nn_distance" in info else _nn_distance(target, bank)
                row = {k: v for k, v in info.items() if np.isscalar(v)}
                row.update(resolved, epoch=epoch, step=len(rows), loss=float(loss.detach()), nn_distance=nn_d,
                           n_target_patches=target.shape[0],
                           n_anomalous_patches=int(extra["anomalous_rows"].sum()) if "anomalous_rows" in extra else 0)
                rows.append(row)
                steps.update(1)
            epoch_nn.append(float(np.mean([r["nn_distance"] for r in rows if r["epoch"] == epoch])))
            if on_epoch_end is not None:
                on_epoch_end(epoch, rows)
            if stop is not None and epoch + 1 >= stop["min_epochs"] and len(epoch_nn) >= 2:
                prev, cur = epoch_nn[-2], epoch_nn[-1]
                if prev - cur < stop["rel_tol"] * abs(prev):
                    rows[-1]["stopped"] = True
                    break
    finally:
        steps.close()
        for p in params:
            p.requires_grad_(False)
        extractor.eval()
    out = pd.DataFrame(rows)
    out.attrs.update(start)  # where the alignment started (bn_start; for "gated", both distances)
    return out
