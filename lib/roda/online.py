"""Test-time adaptation of a PatchCore bank's encoder on a stream of batches, with a label-free guard.

RoDA adapts once, on a fixed 20% split. On a production line images arrive in batches and the shift
drifts (a lamp ages, a lens fogs and is cleaned). :class:`StreamAdapter` takes the batches one at a time
and, for each batch ``B_t``:

1. scores it with the current encoder state ``Theta_t`` (prequential: the batch is scored before it is
   used to adapt, as a line would see it)::

       d_ip = min_k ||z_ip(Theta_t) - m_k||,    s_i = max_p d_ip                  (RoDA Eq. 2)

2. reads two label-free signals from that same forward pass:

   * the *distance signal* ``D_t = mean_ip d_ip``, the batch's mean nearest-bank distance;
   * the *spread signal* ``U_t`` = share of distinct bank entries among the patches' nearest neighbours
     (a collapse of the target features onto a few bank entries drives it down);

3. decides, against running references ``D_ref`` and ``U_ref`` (exponential moving averages over the
   batches it adapted on, started from the first ``warmup`` batches after a start or reset):

   * ``hold``   if ``D_t > hold_ratio * D_ref``: the batch is far from what the state was adapted to
     (a burst of defects, or a jump of the shift): no update on it;
   * ``reset``  after ``patience`` consecutive holds, or if ``U_t < collapse_ratio * U_ref`` while ``D_t``
     is not held (features near the bank but on few of its entries: a collapse), or if the loss is not
     finite: the source BatchNorm state is restored and the references restart;
   * ``source`` (optional, every ``source_check`` batches): if the source state is at least as close to
     the bank on this batch, go back to it (a line that returns to its clean condition);
   * ``adapt``  otherwise: ``steps_per_batch`` SGD steps on the BN affine parameters, minimising
     ``loss_fn(Z(B~_t), M)`` from :data:`lib.roda.alignment.ALIGNMENT_LOSSES`, and the references move::

         D_ref <- rho D_ref + (1 - rho) D_t,     U_ref <- rho U_ref + (1 - rho) U_t

A gradual ramp moves ``D_t`` a little per batch and is followed; a batch of defects or an abrupt jump
moves it a lot and is held; a jump that persists for ``patience`` batches is a new regime: reset to the
source state and re-reference there. :meth:`StreamAdapter.reset` restores the source state at any time.

:class:`OnlineAdapter` is the update alone (the same step is the offline ``roda adapt`` command).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from lib.roda.adaptation import (
    AUGMENTATIONS,
    DATA_DRIVEN_KEYS,
    bn_state,
    is_data_driven,
    resolve_loss_options,
    restore_bn_state,
)
from lib.roda.alignment import ALIGNMENT_LOSSES
from lib.roda.patchcore import nearest_distances

#: the offline augmentations a stream can use (``copy`` repeats a batch, which a stream has no use for)
STREAM_AUGMENTATIONS = tuple(a for a in AUGMENTATIONS if a != "copy")
ACTIONS = ("warmup", "adapt", "hold", "reset", "source")


class StreamError(ValueError):
    """Bad input to the streaming loop; the message names the fix."""


def default_loss_options(method: str, roda: dict | None = None) -> dict:
    """Loss options of ``method`` as the notebooks use them (``roda``: the profile's ``roda`` section)."""
    r = dict(eps=0.05, rule="or", cost="l2", cost_norm="mean")
    r.update({k: v for k, v in (roda or {}).items() if k in r})
    if method == "roda":
        return dict(r)
    if method == "continuous_ot":
        return {k: r[k] for k in ("eps", "cost", "cost_norm")}
    if method == "ttt++":  # TTT++'s normalisation of Eq. 3 (as lib.roda.adaptation.config_from_profile)
        return dict(coral_scaling=True, mean_reduction="mean")
    return {}


def flip_rot90(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The batch plus one random flip / 90-degree turn of each image (0 or 180 degrees if not square)."""
    square = images.shape[-1] == images.shape[-2]
    views = []
    for img in images:
        k = int(torch.randint(0, 4, (1,), generator=generator))
        k = k if square else 2 * (k % 2)
        x = torch.rot90(img, k, dims=(1, 2))
        flips = torch.rand(2, generator=generator) < 0.5
        x = x.flip(2) if flips[0] else x
        views.append(x.flip(1) if flips[1] else x)
    return torch.cat([images, torch.stack(views)])


class OnlineAdapter:
    """SGD on the encoder's BatchNorm affine parameters against the fixed bank, one batch at a time.

    ``method`` names a loss of :data:`lib.roda.alignment.ALIGNMENT_LOSSES`; ``loss`` its options (defaults:
    :func:`default_loss_options`). ``normalize_loss`` divides every loss by its first value (as TTT++ scales
    its CORAL term; default on for ``ttac``, whose raw KL is ~10^3-10^4). The running BatchNorm statistics
    are never touched (eval mode): only ``weight`` and ``bias`` move.
    """

    def __init__(self, model, method: str = "roda", loss: dict | None = None, lr: float = 0.003,
                 momentum: float = 0.9, augment: str = "flip_rot90", normalize_loss: bool | None = None,
                 seed: int = 0, bank_weights=None):
        if method not in ALIGNMENT_LOSSES:
            raise StreamError(f"unknown method {method!r}: choose one of {sorted(ALIGNMENT_LOSSES)}")
        if augment not in STREAM_AUGMENTATIONS:
            raise StreamError(f"unknown augment {augment!r}: choose one of {STREAM_AUGMENTATIONS}")
        if model.bank is None or model.bank.shape[0] == 0:
            raise StreamError("the memory bank is empty: fit PatchCore (or load a bank) first")
        self.model, self.method, self.augment = model, method, augment
        self.loss_fn = ALIGNMENT_LOSSES[method]
        accepted = set(inspect.signature(self.loss_fn).parameters)
        if method == "roda":  # the robust RoDA's data-driven options, fixed on the first batch (no labels)
            accepted |= set(DATA_DRIVEN_KEYS)
        self.options = default_loss_options(method) if loss is None else dict(loss)
        unknown = sorted(set(self.options) - accepted)
        if unknown:
            raise StreamError(f"{method} takes no option(s) {unknown}; its options: "
                              f"{sorted(p for p in accepted if p not in ('target', 'bank'))}")
        if self.options.get("weights") == "coverage" and bank_weights is None:
            raise StreamError("weights='coverage' needs the bank's coverage counts (training patches per entry): "
                              "pass bank_weights (PatchCore.fit(..., coverage=True) keeps them in .coverage)")
        self.bank_weights = bank_weights
        if "stats" in accepted:  # Gaussian baselines: source statistics from the bank, once
            from lib.roda.alignment import source_stats

            self.options["stats"] = source_stats(model.bank)
        self.normalize_loss = (method == "ttac") if normalize_loss is None else bool(normalize_loss)
        self.params = list(model.extractor.bn_affine_parameters())
        if not self.params:
            raise StreamError(f"backbone {getattr(model.extractor, 'name', '?')} has no BatchNorm layer before "
                              "its taps: nothing to adapt")
        self.lr, self.momentum = lr, momentum
        self.generator = torch.Generator().manual_seed(seed)
        self.restart()

    def restart(self) -> None:
        """Fresh optimiser (no momentum carried over) and loss scale, e.g. after a reset; data-driven loss
        options (``eps="auto"``, ``rho="auto"``, ...) are fixed again on the next batch."""
        self.optimizer = torch.optim.SGD(self.params, lr=self.lr, momentum=self.momentum)
        self.loss_scale = None
        self.loss_options, self.resolved = None, {}  # the options the loss takes, fixed on the next batch

    def step(self, images: torch.Tensor) -> dict:
        """One update on ``images`` (B, 3, H, W); returns the loss and the loss's scalar diagnostics."""
        model = self.model
        if self.augment == "flip_rot90":
            images = flip_rot90(images, self.generator)
        for p in self.params:
            p.requires_grad_(True)
        try:
            with model.extractor.differentiable_mode():
                feats = model.embed(images)
            target = feats.reshape(-1, feats.shape[-1])
            if target.shape[1] != model.bank.shape[1]:
                raise StreamError(f"features are {target.shape[1]}-d but the bank is {model.bank.shape[1]}-d: "
                                  "the bank was built with another backbone; rebuild it")
            if self.loss_options is None:
                self.loss_options = dict(self.options)
                if is_data_driven(self.options):
                    self.loss_options = resolve_loss_options(self.options, target, model.bank, self.bank_weights)
                    self.resolved = self.loss_options.pop("resolved")
            loss, info = self.loss_fn(target, model.bank, **self.loss_options)
            info = dict(info, **self.resolved)
            value = float(loss.detach())
            if not np.isfinite(value):
                return dict(loss=value, finite=False)
            if self.normalize_loss:
                self.loss_scale = self.loss_scale or (abs(value) or 1.0)
                loss = loss / self.loss_scale
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        finally:
            for p in self.params:
                p.requires_grad_(False)
        finite = all(bool(torch.isfinite(p).all()) for p in self.params)
        return dict(loss=value, finite=finite, **{k: v for k, v in info.items() if np.isscalar(v)})


@dataclass
class GuardConfig:
    """The label-free guard of :class:`StreamAdapter` (see the module docstring for the rule).

    ``warmup``: batches that set the references after a start or reset (they are adapted on);
    ``hold_ratio``: hold when the distance signal exceeds ``hold_ratio`` times its reference;
    ``patience``: consecutive holds that trigger a reset to the source state;
    ``collapse_ratio``: reset when the spread signal falls below this share of its reference;
    ``momentum``: the references' EMA factor ``rho``; ``enabled=False`` adapts on every batch;
    ``source_check``: every that many batches (0: never) an adapted state also scores the batch with
    the source state; if the source is at least as close to the bank (``D_source <= D_t``), the
    source state is restored, the batch is scored with it and not adapted on (action ``source``).
    """

    warmup: int = 1
    hold_ratio: float = 1.5
    patience: int = 3
    collapse_ratio: float = 0.5
    momentum: float = 0.8
    enabled: bool = True
    source_check: int = 0

    def __post_init__(self):
        if self.source_check < 0:
            raise StreamError(f"source_check is a number of batches (0: off), got {self.source_check}")
        if self.warmup < 1 or self.patience < 1:
            raise StreamError("warmup and patience must be at least 1 batch")
        if self.hold_ratio <= 1.0:
            raise StreamError(f"hold_ratio must exceed 1 (a batch exactly at the reference is adapted on), "
                              f"got {self.hold_ratio}")
        if not 0.0 <= self.momentum < 1.0 or not 0.0 <= self.collapse_ratio < 1.0:
            raise StreamError("momentum and collapse_ratio must lie in [0, 1)")


@dataclass
class StreamConfig:
    """One streaming run: the update (method, its loss options, lr, ...) and the guard."""

    method: str = "roda"
    loss: dict | None = None
    lr: float = 0.003
    momentum: float = 0.9
    steps_per_batch: int = 1
    augment: str = "flip_rot90"
    normalize_loss: bool | None = None
    seed: int = 0
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self):
        if isinstance(self.guard, dict):
            self.guard = GuardConfig(**self.guard)
        if self.steps_per_batch < 1:
            raise StreamError(f"steps_per_batch must be at least 1, got {self.steps_per_batch}")


def batch_signals(model, images: torch.Tensor) -> dict:
    """Scores and guard signals of one batch with the current state (one forward pass, no gradient).

    Returns ``patch_scores`` (B, h, w), ``scores`` (B,), ``distance`` (mean patch-to-bank distance) and
    ``spread`` (distinct nearest bank entries / min(patches, bank size))."""
    with torch.no_grad():
        feats = model.embed(images)
        flat = feats.reshape(-1, feats.shape[-1])
        d, idx = nearest_distances(flat, model.bank)
    patch = d.reshape(images.shape[0], *model.grid)
    spread = torch.unique(idx).numel() / min(flat.shape[0], model.bank.shape[0])
    return dict(patch_scores=patch.cpu(), scores=patch.flatten(1).max(1).values.cpu().numpy(),
                distance=float(d.mean()), spread=float(spread))


class StreamAdapter:
    """Prequential scoring and guarded online adaptation of ``model`` (a fitted PatchCore) on a stream.

    ``process(images)`` scores a batch with the current state, then decides (warmup / adapt / hold /
    reset) and returns the scores with a log row. The source BatchNorm state is snapshotted at
    construction; :meth:`reset` (called by the guard, or by hand) puts it back.
    """

    def __init__(self, model, config: StreamConfig | None = None):
        self.model = model
        self.config = config or StreamConfig()
        self.source = bn_state(model.extractor)
        c = self.config
        self.adapter = OnlineAdapter(model, c.method, c.loss, c.lr, c.momentum, c.augment, c.normalize_loss, c.seed)
        self.log: list[dict] = []
        self._clear_references()

    def _clear_references(self) -> None:
        self.distance_ref = self.spread_ref = None
        self.n_reference = 0
        self.n_held = 0

    def reset(self) -> None:
        """Restore the source BatchNorm state, a fresh optimiser, and restart the references."""
        restore_bn_state(self.model.extractor, self.source)
        self.adapter.restart()
        self._clear_references()

    def _update_references(self, sig: dict) -> None:
        if self.n_reference == 0:
            self.distance_ref, self.spread_ref = sig["distance"], sig["spread"]
        else:
            rho = self.config.guard.momentum
            self.distance_ref = rho * self.distance_ref + (1 - rho) * sig["distance"]
            self.spread_ref = rho * self.spread_ref + (1 - rho) * sig["spread"]
        self.n_reference += 1

    def decide(self, sig: dict) -> str:
        """The guard's action for a batch with signals ``sig`` (before any update on it)."""
        g = self.config.guard
        if not g.enabled:
            return "adapt"
        if self.n_reference < g.warmup:
            return "warmup"
        if sig["distance"] > g.hold_ratio * self.distance_ref:
            return "reset" if self.n_held + 1 >= g.patience else "hold"
        # near the bank but onto few of its entries: the adaptation collapsed the features
        if sig["spread"] < g.collapse_ratio * self.spread_ref:
            return "reset"
        return "adapt"

    def process(self, images: torch.Tensor) -> dict:
        """Score ``images`` with the current state, then adapt, hold or reset. Returns ``scores``,
        ``patch_scores`` and ``row`` (the log entry, also appended to :attr:`log`)."""
        if images.ndim != 4 or images.shape[0] == 0:
            raise StreamError(f"a batch must be (B, 3, H, W) with B >= 1, got {tuple(images.shape)}")
        sig = batch_signals(self.model, images)
        row = dict(batch=len(self.log), distance=sig["distance"], spread=sig["spread"],
                   distance_ref=self.distance_ref, spread_ref=self.spread_ref, loss=float("nan"))
        source_sig = self._source_check(images, sig)
        if source_sig is not None:  # the source state fits this batch at least as well: go back to it
            self.reset()
            self._update_references(source_sig)
            row["action"] = "source"
            self.log.append(row)
            return dict(scores=source_sig["scores"], patch_scores=source_sig["patch_scores"], row=row)
        action = self.decide(sig)
        if action == "hold":
            self.n_held += 1
        elif action == "reset":
            self.reset()
        else:  # warmup or adapt
            self.n_held = 0
            for _ in range(self.config.steps_per_batch):
                out = self.adapter.step(images)
                row["loss"] = out["loss"]
                if not out["finite"]:  # a diverged step never stays: back to the source state
                    self.reset()
                    action = "reset"
                    break
            if action != "reset":
                self._update_references(sig)
        row["action"] = action
        self.log.append(row)
        return dict(scores=sig["scores"], patch_scores=sig["patch_scores"], row=row)

    def _source_check(self, images: torch.Tensor, sig: dict) -> dict | None:
        """The source state's signals on this batch when they beat the current state's (else None)."""
        g = self.config.guard
        if not (g.enabled and g.source_check) or len(self.log) % g.source_check or self._at_source():
            return None
        current = bn_state(self.model.extractor)
        restore_bn_state(self.model.extractor, self.source)
        source_sig = batch_signals(self.model, images)
        if source_sig["distance"] <= sig["distance"]:
            return source_sig
        restore_bn_state(self.model.extractor, current)
        return None

    def _at_source(self) -> bool:
        state = bn_state(self.model.extractor)
        return all(torch.equal(state[k], self.source[k]) for k in state)

    def settings(self) -> dict:
        return asdict(self.config)


def one_shot_adapt(model, batches, config: StreamConfig, epochs: int = 3) -> list[dict]:
    """The offline counterpart: ``epochs`` passes of :class:`OnlineAdapter` over ``batches`` (a list of
    image tensors), no guard. The caller snapshots / restores the state (``bn_state``)."""
    adapter = OnlineAdapter(model, config.method, config.loss, config.lr, config.momentum, config.augment,
                            config.normalize_loss, config.seed)
    rows = []
    for epoch in range(epochs):
        for images in batches:
            out = adapter.step(images)
            rows.append(dict(epoch=epoch, loss=out["loss"]))
            if not out["finite"]:
                raise StreamError(f"{config.method} diverged at epoch {epoch} (loss {out['loss']}): lower lr")
    return rows
