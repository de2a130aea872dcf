"""Open-set baselines under DPDL's protocol and backbone (DevNet, DRA, FLOS) and the benchmark runner.

Every method sees the same inputs as DPDL: the frozen backbone's deep-tap maps (cached by
:class:`lib.dpdl.features.MapCache`) and the same trainable :class:`lib.dpdl.engine.Trunk` (per-channel
standardisation and two 1x1 convs). The originals fine-tune a ResNet-18 end to end at two scales (448 and
224 px); here one scale and a frozen backbone, for all methods alike.

- **DevNet** (Pang et al.; ``Choubo/deviation-network-image``): one 1x1-conv score per location, top-K mean
  (K = 10%), deviation loss with margin 5. No pseudo anomalies.
- **DRA** (Ding et al. 2022): four heads, holistic (GAP -> FC -> ReLU -> FC -> abs, trained on normality and
  subtracted), seen (top-K, on labels 0/1), pseudo (top-K, on labels 0/2) and composite (residual to the mean
  trunk map of reference normals -> 3x3 conv + BN + ReLU -> top-K), each with the deviation loss; score
  ``-holistic + seen + pseudo + composite``. CutMix pseudo anomalies as in DRA.
- **FLOS**: a plain classifier (GAP -> FC -> ReLU -> FC) trained with the focal loss (Lin et al.; gamma 2,
  alpha 0.25). No pseudo anomalies.

Determinism fixes (reference implementations, notes c.2): the deviation loss's reference scores are ONE seeded
N(0, 1) sample of 5000 values drawn when the model is built (the originals resample on every call); DRA's
reference normals are ``n_ref`` training normals chosen once by the seed (the originals draw new ones for every
test batch, so their test scores are random).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.common.metrics import image_auroc
from lib.common.utils import progress, seed_everything
from lib.dpdl.engine import FeatureBank, OpenSetModel, TrainConfig, Trunk, fit_model, score_maps, topk_mean
from lib.dpdl.features import MapCache
from lib.dpdl.model import DPDLNet
from lib.dpdl.protocol import OpenSetSplit

__all__ = [
    "DRA",
    "DevNet",
    "DeviationLoss",
    "FLOS",
    "METHODS",
    "build_model",
    "focal_loss",
    "run_openset",
    "run_split",
]


class DeviationLoss(nn.Module):
    """DevNet's deviation loss ``(1 - y)|dev| + y max(0, margin - dev)``, ``dev = (s - mean r) / std r``.

    The reference scores r ~ N(0, 1) (``n_ref`` = 5000) are drawn once from a generator seeded by ``seed``,
    so the loss is a deterministic function of the scores (the original resamples r on every call).
    """

    def __init__(self, margin: float = 5.0, n_ref: int = 5000, seed: int = 0):
        super().__init__()
        r = torch.randn(n_ref, generator=torch.Generator().manual_seed(int(seed)))
        self.margin = float(margin)
        self.register_buffer("ref_mean", r.mean())
        self.register_buffer("ref_std", r.std())

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if scores.numel() == 0:
            return scores.sum()
        dev = (scores - self.ref_mean) / self.ref_std
        target = target.float()
        return ((1 - target) * dev.abs() + target * F.relu(self.margin - dev)).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = 0.25):
    """Binary focal loss (Lin et al. 2017): ``-alpha_t (1 - p_t)^gamma log p_t``, mean over the batch."""
    target = target.float()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-ce)
    loss = (1 - p_t) ** gamma * ce
    if alpha is not None:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean()


class _TrunkModel(OpenSetModel):
    def __init__(self, in_channels: int, feature_dim: int = 64, tail: nn.Module | None = None):
        super().__init__()
        self.trunk = Trunk(in_channels, feature_dim, tail)
        self.feature_dim = feature_dim

    def prepare(self, normal_maps: torch.Tensor, seed: int = 0) -> None:
        self.trunk.fit_stats(normal_maps)


class DevNet(_TrunkModel):
    """DevNet-image on the shared trunk: 1x1 conv scores, top-K (``topk_ratio``) mean, deviation loss."""

    uses_pseudo = False

    def __init__(self, in_channels: int, feature_dim: int = 64, topk_ratio: float = 0.1, margin: float = 5.0,
                 ref_seed: int = 0, tail: nn.Module | None = None):
        super().__init__(in_channels, feature_dim, tail)
        self.head = nn.Conv2d(feature_dim, 1, 1)
        self.topk_ratio = topk_ratio
        self.criterion = DeviationLoss(margin, seed=ref_seed)

    def _score(self, maps):
        return topk_mean(self.head(self.trunk(maps)), self.topk_ratio)

    def loss(self, maps, labels):
        loss = self.criterion(self._score(maps), (labels > 0).float())
        return loss, {"deviation": float(loss.detach())}

    @torch.no_grad()
    def score(self, maps):
        return self._score(maps.float())


class DRA(_TrunkModel):
    """DRA's composite heads on the shared trunk (see the module docstring); ``n_ref`` fixed reference normals."""

    uses_pseudo = True

    def __init__(self, in_channels: int, feature_dim: int = 64, topk_ratio: float = 0.1, margin: float = 5.0,
                 n_ref: int = 5, hidden: int = 256, ref_seed: int = 0, tail: nn.Module | None = None):
        super().__init__(in_channels, feature_dim, tail)
        d = feature_dim
        self.topk_ratio, self.n_ref = topk_ratio, n_ref
        self.holistic = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        self.seen = nn.Conv2d(d, 1, 1)
        self.pseudo = nn.Conv2d(d, 1, 1)
        self.composite = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.BatchNorm2d(d), nn.ReLU(inplace=True),
                                       nn.Conv2d(d, 1, 1))
        self.criterion = DeviationLoss(margin, seed=ref_seed)
        self.register_buffer("ref_maps", torch.zeros(0))

    def prepare(self, normal_maps, seed: int = 0):
        super().prepare(normal_maps, seed)
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(normal_maps), generator=g)[: self.n_ref]
        self.ref_maps = normal_maps[idx].detach().float().clone()

    def _heads(self, maps):
        a = self.trunk(maps)
        ref = self.trunk(self.ref_maps).mean(0, keepdim=True)
        return dict(
            holistic=self.holistic(a.mean(dim=(2, 3))).squeeze(1).abs(),
            seen=topk_mean(self.seen(a).abs(), self.topk_ratio),
            pseudo=topk_mean(self.pseudo(a).abs(), self.topk_ratio),
            composite=topk_mean(self.composite(ref - a).abs(), self.topk_ratio),
        )

    def loss(self, maps, labels):
        h = self._heads(maps)
        anomalous = (labels > 0).float()
        terms = dict(
            holistic=self.criterion(h["holistic"], (labels == 0).float()),
            seen=self.criterion(h["seen"][labels != 2], anomalous[labels != 2]),
            pseudo=self.criterion(h["pseudo"][labels != 1], anomalous[labels != 1]),
            composite=self.criterion(h["composite"], anomalous),
        )
        total = sum(terms.values())
        return total, {k: float(v.detach()) for k, v in terms.items()}

    @torch.no_grad()
    def score(self, maps):
        h = self._heads(maps.float())
        return -h["holistic"] + h["seen"] + h["pseudo"] + h["composite"]


class FLOS(_TrunkModel):
    """A focal-loss image classifier on the shared trunk (GAP -> FC -> ReLU -> FC)."""

    uses_pseudo = False

    def __init__(self, in_channels: int, feature_dim: int = 64, hidden: int = 256, gamma: float = 2.0,
                 alpha: float | None = 0.25, tail: nn.Module | None = None):
        super().__init__(in_channels, feature_dim, tail)
        self.head = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        self.gamma, self.alpha = gamma, alpha

    def _score(self, maps):
        return self.head(self.trunk(maps).mean(dim=(2, 3))).squeeze(1)

    def loss(self, maps, labels):
        loss = focal_loss(self._score(maps), labels > 0, self.gamma, self.alpha)
        return loss, {"focal": float(loss.detach())}

    @torch.no_grad()
    def score(self, maps):
        return self._score(maps.float())


METHODS = {"dpdl": DPDLNet, "devnet": DevNet, "dra": DRA, "flos": FLOS}


def build_model(method: str, in_channels: int, **kwargs) -> OpenSetModel:
    """A fresh model of ``method`` (one of :data:`METHODS`) for maps with ``in_channels`` channels.

    ``tail=`` (any method): the backbone's last block(s) to fine-tune on cached earlier activations
    (:class:`lib.dpdl.engine.Trunk`); ``in_channels`` is then the tail's output width.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {sorted(METHODS)}")
    return METHODS[method](in_channels, **kwargs)


def _method_specs(methods) -> dict:
    """Normalise ``methods``: a list of names, or {label: name} / {label: (name, kwargs)}."""
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, Mapping):
        return {m: (m, {}) for m in methods}
    out = {}
    for label, spec in methods.items():
        name, kwargs = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]))
        out[label] = (name, kwargs)
    return out


def run_split(split: OpenSetSplit, cache: MapCache, method: str = "dpdl", model_kwargs: dict | None = None,
              train: TrainConfig | None = None, pseudo_variants: int = 1, label: str | None = None,
              rotation_variants: int = 0):
    """Train one method on one split and score its test set.

    The augmentation pool (:mod:`lib.dpdl.features`): ``pseudo_variants`` CutMix pseudo anomalies per training
    normal (for the methods that use them) and ``rotation_variants`` rotated copies per training normal (every
    method); the sampler draws from the pool afresh at every step. Returns (row, model, history): ``row`` holds
    the split's summary, ``auroc`` and timings; ``history`` the per-iteration losses. The run seed is
    ``split.seed`` (weights, prototype init and batches).
    """
    train = TrainConfig(**{**(train.to_dict() if train else {}), "seed": split.seed})
    normal = cache.maps(split.train_normal)
    anomaly = cache.maps(split.train_anomaly)
    seed_everything(split.seed)
    in_channels = normal.shape[1]
    if (model_kwargs or {}).get("tail") is not None:  # partial fine-tuning: the trunk sees the tail's output
        with torch.no_grad():
            tail = copy.deepcopy(model_kwargs["tail"]).eval()
            device = next(tail.parameters(), normal).device
            in_channels = tail(normal[:1].float().to(device)).shape[1]
    model = build_model(method, in_channels, **(model_kwargs or {}))
    pseudo = cache.pseudo_maps(split.train_normal, pseudo_variants) if model.uses_pseudo and pseudo_variants else None
    rotated = cache.rotated_maps(split.train_normal, rotation_variants) if rotation_variants else None
    start = time.perf_counter()
    history = fit_model(model, FeatureBank(normal, anomaly, pseudo, rotated), train)
    train_s = time.perf_counter() - start
    test_maps = cache.maps(split.test)
    start = time.perf_counter()
    scores = score_maps(model, test_maps, device=train.device)
    row = dict(split.summary(), method=label or method, base_method=method,
               auroc=image_auroc(split.test_labels, scores),
               train_seconds=round(train_s, 2), score_seconds=round(time.perf_counter() - start, 3),
               final_loss=float(history["loss"].iloc[-5:].mean()) if len(history) else float("nan"))
    history = history.assign(method=label or method, seed=split.seed, n_anomalies=split.n_anomalies,
                             setting=split.setting, seen_class=split.seen_class or "all", task=split.name)
    return row, model, history


def run_openset(splits: Sequence[OpenSetSplit], cache: MapCache, methods=("dpdl", "devnet", "dra"),
                train: TrainConfig | None = None, pseudo_variants: int = 1, show_progress: bool = True,
                rotation_variants: int = 0):
    """Every (split, method) run: returns (results DataFrame, training histories DataFrame).

    ``methods``: names from :data:`METHODS`, or a dict ``{label: (name, model_kwargs)}`` for variants
    (ablations, sensitivity), e.g. ``{"w/o DFL": ("dpdl", {"use_dfl": False})}``.
    """
    specs = _method_specs(methods)
    jobs = [(s, label, spec) for s in splits for label, spec in specs.items()]
    rows, histories = [], []
    it = progress(jobs, desc="open-set runs") if show_progress else jobs
    for split, label, (name, kwargs) in it:
        row, _, hist = run_split(split, cache, name, kwargs, train, pseudo_variants, label=label,
                                 rotation_variants=rotation_variants)
        rows.append(row)
        histories.append(hist)
    return pd.DataFrame(rows), (pd.concat(histories, ignore_index=True) if histories else pd.DataFrame())
