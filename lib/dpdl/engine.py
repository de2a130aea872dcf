"""The training engine every open-set model shares (DPDL, DevNet, DRA, FLOS): the trainable trunk, the model
interface, DRA's balanced batch sampler over cached maps, the optimisation loop and scoring.

Pipeline::

    image --(frozen backbone, deep tap, stride 32)--> map (B, C_in, h, w)       [cached, lib.dpdl.features]
          --(standardise per channel, 1x1 conv, ReLU, 1x1 conv: the trunk)--> a (B, d, h, w)  -> heads

Batches (DRA's ``BalancedBatchSampler`` and dataset): ``anomaly_fraction`` (1/3) seen anomalies, the rest
normals; each normal slot holds a CutMix pseudo anomaly (label 2) with probability ``pseudo_prob`` (0.5) when the
model uses them, and otherwise a normal drawn from the original maps and their rotated variants. Every draw
comes from one generator seeded by the run seed, so a run is a deterministic function of its seed.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from lib.common.utils import progress, seed_everything, stable_hash

__all__ = ["FeatureBank", "OpenSetModel", "TrainConfig", "Trunk", "fit_model", "sample_batch", "score_maps",
           "topk_mean"]


def topk_mean(score_map: torch.Tensor, ratio: float = 0.1) -> torch.Tensor:
    """Mean of the top ``K = max(1, int(ratio * H * W))`` scores of each map (MIL, DevNet/DRA ``PlainHead``).

    ``score_map``: (B, H, W) or (B, 1, H, W) -> (B,).
    """
    flat = score_map.reshape(score_map.shape[0], -1)
    k = max(1, int(flat.shape[1] * ratio))
    return flat.topk(k, dim=1).values.mean(dim=1)


class Trunk(nn.Module):
    """Trainable trunk on the frozen backbone's map: per-channel standardisation (statistics of the training
    normals, fitted in ``prepare``) -> 1x1 conv (C_in -> d) -> ReLU -> 1x1 conv (d -> d).

    Partial fine-tuning: ``tail`` is the backbone's last block(s) (e.g. MobileNetV2 ``features.18``), applied
    first and trained with the rest; the cached maps are then the activations *before* the tail, and
    ``in_channels`` is the tail's output width. A private copy is taken (every run starts from the pretrained
    weights). None (default): the frozen backbone's deep tap is the input.
    """

    def __init__(self, in_channels: int, feature_dim: int = 64, tail: nn.Module | None = None):
        super().__init__()
        self.tail = None if tail is None else copy.deepcopy(tail).requires_grad_(True)
        self.register_buffer("mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("std", torch.ones(1, in_channels, 1, 1))
        self.net = nn.Sequential(nn.Conv2d(in_channels, feature_dim, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(feature_dim, feature_dim, 1))
        self.out_channels = feature_dim

    def _tail(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.float() if self.tail is None else self.tail(maps.float())

    @torch.no_grad()
    def fit_stats(self, maps: torch.Tensor) -> None:
        maps = torch.cat([self._tail(chunk) for chunk in maps.split(256)])
        self.mean.copy_(maps.mean(dim=(0, 2, 3), keepdim=True))
        self.std.copy_(maps.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-4))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net((self._tail(maps) - self.mean) / self.std)


class OpenSetModel(nn.Module):
    """Interface of every open-set model trained by :func:`fit_model`.

    ``prepare(normal_maps, seed)`` initialises data-dependent parts before training; ``loss(maps, labels)`` with
    labels 0 normal / 1 seen anomaly / 2 pseudo anomaly returns (loss, dict of float parts); ``score(maps)``
    returns anomaly scores (B,) (higher = more anomalous). ``uses_pseudo`` says whether batches get CutMix
    pseudo anomalies.
    """

    uses_pseudo: bool = True

    def prepare(self, normal_maps: torch.Tensor, seed: int = 0) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def loss(self, maps: torch.Tensor, labels: torch.Tensor):  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, maps: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class FeatureBank:
    """Training maps of one open-set run: normals, seen anomalies, and the augmentation pool (may be None):
    ``pseudo`` CutMix pseudo anomalies, ``rotated`` rotated normals (both any number of variants per normal)."""

    normal: torch.Tensor
    anomaly: torch.Tensor
    pseudo: torch.Tensor | None = None
    rotated: torch.Tensor | None = None


@dataclass
class TrainConfig:
    """Optimisation of every open-set model (paper: 50 x 20 iterations, AdamW 2e-4, wd 1e-5, batch 48).

    ``anomaly_fraction`` of each batch are seen anomalies (DRA's sampler: 1/3); each remaining normal slot holds a
    pseudo anomaly with probability ``pseudo_prob`` (DRA: 0.5) when the model uses them. ``grad_clip`` None = off.
    """

    epochs: int = 50
    iterations: int = 20
    batch_size: int = 48
    lr: float = 2e-4
    weight_decay: float = 1e-5
    anomaly_fraction: float = 1 / 3
    pseudo_prob: float = 0.5
    grad_clip: float | None = None
    seed: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


def sample_batch(bank: FeatureBank, cfg: TrainConfig, use_pseudo: bool, g: torch.Generator):
    """One balanced batch (maps, labels) drawn with ``g``: normals uniformly from the originals and the rotated
    pool together, a pseudo anomaly (label 2) in a normal slot with probability ``pseudo_prob``, seen anomalies
    (label 1) in ``anomaly_fraction`` of the slots."""
    n_anom_avail = 0 if bank.anomaly is None else len(bank.anomaly)
    n_a = min(cfg.batch_size - 1, max(1, round(cfg.batch_size * cfg.anomaly_fraction))) if n_anom_avail else 0
    n_n = cfg.batch_size - n_a
    n_rot = 0 if bank.rotated is None else len(bank.rotated)
    normal_idx = torch.randint(len(bank.normal) + n_rot, (n_n,), generator=g)
    rotated = normal_idx >= len(bank.normal)
    normal = bank.normal[normal_idx.clamp_max(len(bank.normal) - 1)]
    if rotated.any():
        normal[rotated] = bank.rotated[normal_idx[rotated] - len(bank.normal)]
    maps, labels = [normal], [torch.zeros(n_n, dtype=torch.long)]
    if use_pseudo and bank.pseudo is not None and len(bank.pseudo) and cfg.pseudo_prob > 0:
        swap = torch.rand(n_n, generator=g) < cfg.pseudo_prob
        if swap.any():
            pidx = torch.randint(len(bank.pseudo), (int(swap.sum()),), generator=g)
            maps[0][swap] = bank.pseudo[pidx]
            labels[0][swap] = 2
    if n_a:
        aidx = torch.randint(n_anom_avail, (n_a,), generator=g)
        maps.append(bank.anomaly[aidx])
        labels.append(torch.ones(n_a, dtype=torch.long))
    return torch.cat(maps).float(), torch.cat(labels)


def fit_model(model: OpenSetModel, bank: FeatureBank, cfg: TrainConfig | None = None,
              show_progress: bool = False) -> pd.DataFrame:
    """Train ``model`` on ``bank`` (``prepare`` first); returns the per-iteration history (loss and parts).

    Deterministic for ``cfg.seed``: it fixes the prototype init and every batch; seed (``seed_everything``) before
    building the model to fix its initial weights too (:func:`lib.dpdl.baselines.run_openset` does).
    """
    cfg = cfg or TrainConfig()
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device)
    model.prepare(bank.normal.to(device).float(), seed=cfg.seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(stable_hash("batches", cfg.seed))
    rows = []
    steps = range(cfg.epochs * cfg.iterations)
    if show_progress:
        steps = progress(steps, desc=f"train {type(model).__name__}")
    model.train()
    for step in steps:
        maps, labels = sample_batch(bank, cfg, getattr(model, "uses_pseudo", True), g)
        loss, parts = model.loss(maps.to(device), labels.to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at step {step}: lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        rows.append(dict(step=step, epoch=step // cfg.iterations, loss=float(loss.detach()), **parts))
    model.eval()
    return pd.DataFrame(rows)


@torch.no_grad()
def score_maps(model: OpenSetModel, maps: torch.Tensor, batch_size: int = 128, device="cpu") -> np.ndarray:
    """Anomaly scores of cached maps in eval mode (deterministic)."""
    model.eval()
    out = [model.score(chunk.to(device).float()).cpu() for chunk in maps.split(batch_size)]
    return torch.cat(out).numpy()
