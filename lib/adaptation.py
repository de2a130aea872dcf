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
from :data:`lib.alignment.ALIGNMENT_LOSSES`).

Open choices (the paper is silent; each is a parameter, measured in notebooks 03/04):

* ``bn_mode``: ``"eval"`` keeps the source running statistics (only the affine parameters move);
  ``"train"`` normalises with batch statistics while adapting and updates the running statistics,
  which are then used to score.
* ``augment``: ``"none"``, ``"copy"`` (the batch twice: the "direct copy" ablation) or ``"flip_rot90"``
  (the batch plus one random flip/90-degree-rotation view of each image; non-square images such as
  KolektorSDD strips are turned by 0 or 180 degrees only). The augmentation knows nothing about the
  corruption.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .alignment import ALIGNMENT_LOSSES, roda_loss, source_stats
from .data import DataError, make_loader
from .pipeline import dataset, evaluate, target_split
from .utils import progress, torch_save

AUGMENTATIONS = ("none", "copy", "flip_rot90")


class AdaptationError(ValueError):
    """Bad input to the adaptation loop; the message names the fix."""


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
    seed: int = 0
    loss: dict = field(default_factory=dict)  # forwarded to the alignment loss (eps, rule, cost, ...)
    anomalous_patch_fraction: float = 0.5  # a patch is anomalous when this share of its cell is defect
    # divide the loss by its (detached) value at the first step, as TTT++ scales its CORAL term by the
    # source value; the Gaussian-KL baseline needs it (its raw value is ~10^3-10^4 on 256-d features)
    normalize_loss: bool = False

    def __post_init__(self):
        if self.method != "patchcore" and self.method not in ALIGNMENT_LOSSES:
            raise AdaptationError(f"unknown method {self.method!r}: choose one of {sorted(ALIGNMENT_LOSSES)}")
        if self.augment not in AUGMENTATIONS:
            raise AdaptationError(f"unknown augment {self.augment!r}: choose one of {AUGMENTATIONS}")
        if self.steps is not None and self.steps < 1:
            raise AdaptationError(f"steps must be a positive number of optimisation steps (or None), got {self.steps}")
        if self.bn_mode not in ("eval", "train"):
            raise AdaptationError(f"bn_mode must be 'eval' or 'train', got {self.bn_mode!r}")


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
        k = int(torch.randint(0, 4, (1,), generator=generator)) if square else 2 * int(torch.randint(0, 2, (1,), generator=generator))
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


def adapt(model, dataset, config: AdaptConfig, show_progress: bool = True) -> pd.DataFrame:
    """Adapt ``model.extractor``'s BatchNorm affine parameters on ``dataset`` (the adaptation split).

    Returns the per-step diagnostics: loss, share of target patches assigned, pairs, OT iterations and,
    where masks exist, how many anomalous target patches received an assignment (RoDA Fig. 5a).
    """
    if len(dataset) == 0:
        raise AdaptationError("the adaptation split is empty: raise corruption.adapt_fraction or add target images")
    model._check_bank()
    extractor = model.extractor
    params = list(extractor.bn_affine_parameters())
    if not params:
        raise AdaptationError(f"backbone {extractor.name} has no BatchNorm layer before its taps: nothing to adapt")
    loss_fn = ALIGNMENT_LOSSES[config.method]
    bank = model.bank
    accepted = inspect.signature(loss_fn).parameters
    static = dict(config.loss)
    if "stats" in accepted:  # Gaussian baselines: source statistics from the bank only, computed once
        static["stats"] = source_stats(bank)
    generator = torch.Generator().manual_seed(config.seed)
    loader = make_loader(dataset, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    for p in params:
        p.requires_grad_(True)
    if config.bn_mode == "train":
        for bn in extractor.bn_modules():
            bn.train()
    rows, loss_scale = [], None
    total = config.steps if config.steps is not None else config.epochs * len(loader)
    n_epochs = -(-total // len(loader))  # enough passes over the split for ``total`` steps
    steps = progress(total=total, desc=f"adapt {config.method}", leave=False, disable=not show_progress)
    try:
        for epoch in range(n_epochs):
            for batch in loader:
                if len(rows) == total:
                    break
                images, masks = augment_batch(batch["image"], batch["mask"], config.augment, generator)
                with extractor.differentiable_mode():
                    feats = model.embed(images)
                if feats.shape[-1] != bank.shape[1]:
                    raise AdaptationError(f"features are {feats.shape[-1]}-d but the bank is {bank.shape[1]}-d: "
                                          "the bank was built with another backbone or aggregation; rebuild it")
                target = feats.reshape(-1, feats.shape[-1])
                if not torch.isfinite(target).all():
                    raise AdaptationError("NaN/inf in target features: the adaptation diverged; lower lr")
                anomalous = None
                if masks.any():
                    anomalous = anomalous_patches(masks, model.grid, config.anomalous_patch_fraction).to(target.device)
                extra = dict(anomalous_rows=anomalous) if anomalous is not None and "anomalous_rows" in accepted else {}
                loss, info = loss_fn(target, bank, **static, **extra)
                if not torch.isfinite(loss):
                    raise AdaptationError(f"{config.method} loss is {float(loss)} at step {len(rows)}: the adaptation "
                                          "diverged; lower lr or set normalize_loss=True")
                if config.normalize_loss:
                    if loss_scale is None:
                        loss_scale = float(loss.detach()) or 1.0
                    loss = loss / loss_scale
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                rows.append(dict(epoch=epoch, step=len(rows), loss=float(loss.detach()),
                                 n_target_patches=target.shape[0],
                                 n_anomalous_patches=int(anomalous.sum()) if anomalous is not None else 0,
                                 **{k: v for k, v in info.items() if np.isscalar(v)}))
                steps.update(1)
    finally:
        steps.close()
        for p in params:
            p.requires_grad_(False)
        extractor.eval()
    return pd.DataFrame(rows)


def adapt_and_evaluate(model, task, adapt_samples, eval_samples, corruption, severity, config: AdaptConfig,
                       eval_seed: int = 0, batch_size: int = 16, restore: bool = True, keep_maps: bool = False,
                       bn_file=None) -> tuple[dict, pd.DataFrame]:
    """Adapt on ``adapt_samples``, score ``eval_samples`` (both shifted by ``corruption``), then restore
    the source BatchNorm state (unless ``restore=False``). ``method="patchcore"`` skips adaptation."""
    if not eval_samples:
        raise DataError("the evaluation split is empty: lower corruption.adapt_fraction")
    source = bn_state(model.extractor)
    t0 = time.perf_counter()
    history = pd.DataFrame()
    try:
        if config.method != "patchcore":
            try:
                history = adapt(model, dataset(task, adapt_samples, corruption, severity, eval_seed), config)
            except AdaptationError as err:
                if "diverged" not in str(err):
                    raise
                # a diverged run is a result too: recorded as NaN with the reason, not silently dropped
                return dict(image_auroc=float("nan"), pixel_auroc=float("nan"), diverged=str(err),
                            adapt_seconds=time.perf_counter() - t0, steps=0), history
            if bn_file is not None:
                save_bn_state(model.extractor, bn_file, info=asdict(config))
        adapt_seconds = time.perf_counter() - t0
        res = evaluate(model, task, eval_samples, corruption, severity, eval_seed, batch_size, keep_maps=keep_maps)
    finally:
        if restore:
            restore_bn_state(model.extractor, source)
    res.update(adapt_seconds=adapt_seconds, steps=len(history), diverged="")
    return res, history


def config_from_profile(cfg, method: str, seed: int = 0, **overrides) -> AdaptConfig:
    """An :class:`AdaptConfig` from the profile's ``roda`` section (loss options for the OT methods)."""
    r = copy.deepcopy(dict(cfg["roda"]))
    r.update(overrides.pop("roda", {}))
    loss, defaults = {}, {}
    if method == "ttt++":  # the TTT++ code's normalisation of Eq. 3: CORAL scaling 1/(4 d^2), mean over dims
        loss = dict(coral_scaling=True, mean_reduction="mean")
    if method == "ttac":
        defaults["normalize_loss"] = True
    if method in ("roda", "continuous_ot"):
        loss = dict(eps=r["eps"], cost=r["cost"], cost_norm=r["cost_norm"])
        if method == "roda":
            loss["rule"] = r["rule"]
    loss.update(overrides.pop("loss", {}))
    fields = dict(epochs=r["epochs"], lr=r["lr"], momentum=r["momentum"], batch_size=r["batch_size"],
                  augment=r["augment"], bn_mode=r["bn_mode"])
    fields.update(defaults)
    fields.update(overrides)
    return AdaptConfig(method=method, seed=seed, loss=loss, **fields)


def assignment_census(model, dataset, augment: str, eps: float, rule: str = "or", seed: int = 0,
                      batch_size: int = 10, cost: str = "l2", cost_norm: str = "mean",
                      anomalous_patch_fraction: float = 0.5) -> dict:
    """RoDA Fig. 5a: in one target batch, how many anomalous patches does the discrete plan assign?

    The batch is augmented with ``augment``; the plan is solved against the bank with the current
    encoder; only the patches of the *original* images are counted (the paper's total of anomalous
    patches is the same for all three strategies), and a patch counts as assigned when it is the
    column argmax of some bank entry (see :func:`lib.transport.assignment_stats`)."""
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
        # the same plan, discretisation and counts as one step of the adaptation loop
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
        finally:
            restore_bn_state(model.extractor, source)
        rows.append(dict(task=task.name, choice=name, condition=c, seed=seed,
                         adapt_split_auroc=on_adapt["image_auroc"], eval_split_auroc=on_eval["image_auroc"]))
    return pd.DataFrame(rows)
