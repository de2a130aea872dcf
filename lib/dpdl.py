"""DPDL (Wang et al., CVPR 2025): distribution prototypes, a light Schrodinger bridge, dispersion learning and
MIL heads for open-set supervised anomaly detection; plus the training engine the baselines share.

No public code exists for DPDL; every choice the paper leaves open is a parameter, documented here.

Pipeline (all methods of :mod:`lib.openset_baselines` share it)::

    image --(frozen backbone, deep tap, stride 32)--> map (B, C_in, h, w)        [cached once per image]
          --(standardise per channel, 1x1 conv, ReLU, 1x1 conv: the trainable trunk)--> a (B, d, h, w)
    DPDL: x = flatten(a) / ||flatten(a)||  (unit vector of dimension D = d*h*w, paper footnote 2)
          prototypes + bridge on x (Eqs. 8-17), dispersion on x (Eq. 19), heads on a (Eqs. 20-22)

The backbone is frozen (``lib.backbones``; the paper's ResNet-18 is fine-tuned, which 2 CPU cores cannot
afford); its maps are cached (:class:`MapCache`), so training runs on cached maps and costs milliseconds per
step. The trainable trunk is what the dispersion and bridge losses shape.

Prototypes and bridge (LightSB, Korotin et al. 2023, in the paper's notation). The target potential is the
Gaussian mixture ``phi_1(y) = sum_c alpha_c N(y; mu_c, eps S_c)`` with diagonal ``S_c`` (so the paper's
covariance ``sigma_c`` is ``eps S_c``; LightSB's parametrisation, which keeps Eq. 13 finite for eps = 1e-3).
Closed forms, all in the log domain (logsumexp), so eps = 1e-3 is stable:

- log-partition (Eq. 12's normaliser) ``log varpi(x) = logsumexp_c[log alpha_c + (mu_c.x + x^T S_c x / 2)/eps]``
- conditional plan (Eq. 13) ``pi(y|x) = sum_c w_c(x) N(y; mu_c + S_c x, eps S_c)``,
  ``w_c = softmax_c[log alpha_c + (mu_c.x + x^T S_c x / 2)/eps]``
- drift (Eq. 14, LightSB's ``get_drift`` in closed form for diagonal S) and an Euler-Maruyama sampler
- normal loss (Eq. 16) ``mean_i log varpi(x_i^n) - mean_c log phi_1(mu_c)``; anomaly loss (Eq. 17) its negation
  on the seen anomalies. Note: summed with equal weights (Eq. 23) the ``phi_1(mu_c)`` terms cancel and DPL is
  ``mean log varpi(x^n) - mean log varpi(x^a)``: normals get a low log-partition, anomalies a high one.

Choices where the paper is silent (each a parameter of :class:`DPDLNet`):

- ``feature_dim`` (64): channels of the trunk; ``n_prototypes`` C = 32; ``eps`` = 1e-3; ``s_init`` = 1 (the
  paper initialises the variances to identity); log-weights learnable, normalised by a log-softmax.
- Prototype means are initialised by k-means (vector quantisation, Eq. 15) of the normal training embeddings
  under the freshly initialised trunk (``kmeans_iters``; with fewer normals than C, extra centres are jittered
  copies).
- ``dpl_weight`` (None = eps): the DPL terms are O(1/eps) (about 1000x the MIL losses at eps = 1e-3); by default
  they are multiplied by eps, i.e. measured in units of eps, which keeps Eq. 23's terms on one scale. Pass
  ``dpl_weight=1.0`` for Eq. 23 literally.
- ``dpl_pseudo`` (True): CutMix pseudo anomalies count as anomalies in Eq. 17 and in the MIL targets.
- The bridge map psi_p(x) of Eq. 22 is the deterministic conditional mean ``E[y|x]`` of the plan; ``c*`` the
  prototype of highest density at psi_p(x); the residual ``(psi_p(x) - mu_c*) / sqrt(eps S_c*)`` is reshaped to
  (d, h, w) and scored like M_a (1x1 conv + top-K).
- MIL (Eqs. 20-22): ``L_binary`` is BCE-with-logits; M_a: 1x1 conv per location, mean of the top K = 10% of the
  map; M_n: global average pool -> FC(d, 256) -> ReLU -> FC(256, 1) trained on *normality* (target 1 - y, as
  DRA's holistic head); M_r as above. Score ``S = S_a + S_r - S_n`` (logits) over the enabled ``heads``.
- Dispersion (Eq. 19) on the unit embeddings x of every sample in the batch (U = N + M), kappa = 10, lambda = 0.01.
- Training: balanced batches (DRA's sampler): a third seen anomalies, the rest normals of which each is replaced
  by a CutMix pseudo anomaly with probability 0.5; AdamW(2e-4, wd 1e-5); ``epochs x iterations``.
- Pseudo anomalies: a fixed pool of ``pseudo_variants`` CutMix images per training normal (seeded by the image
  path, shared by all runs; run seeds pick from it), so their backbone maps are cached like the others.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import AnomalyDataset
from .utils import progress, seed_everything, stable_hash, torch_save

__all__ = [
    "DPDLNet",
    "FeatureBank",
    "GaussianPrototypes",
    "MapCache",
    "OpenSetModel",
    "TrainConfig",
    "Trunk",
    "cutmix_pseudo_anomaly",
    "dispersion_loss",
    "fit_model",
    "kmeans",
    "score_maps",
    "topk_mean",
    "unit_embedding",
]

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------------
# Small building blocks
# ----------------------------------------------------------------------------------------------------


def topk_mean(score_map: torch.Tensor, ratio: float = 0.1) -> torch.Tensor:
    """Mean of the top ``K = max(1, int(ratio * H * W))`` scores of each map (MIL, DevNet/DRA ``PlainHead``).

    ``score_map``: (B, H, W) or (B, 1, H, W) -> (B,).
    """
    flat = score_map.reshape(score_map.shape[0], -1)
    k = max(1, int(flat.shape[1] * ratio))
    return flat.topk(k, dim=1).values.mean(dim=1)


def dispersion_loss(features: torch.Tensor, kappa: float = 10.0) -> torch.Tensor:
    """Eq. 19: ``1/U sum_i log( 1/(U-1) sum_{j != i} exp(kappa <x_i, x_j>) )`` on unit-normalised features.

    Low when the features are spread over the hypersphere, high (= kappa) when they collapse to one direction.
    """
    u = features.shape[0]
    if u < 2:
        return features.new_zeros(())
    x = F.normalize(features.reshape(u, -1), dim=1)
    logits = kappa * (x @ x.T)
    logits = logits.masked_fill(torch.eye(u, dtype=torch.bool, device=x.device), float("-inf"))
    return (torch.logsumexp(logits, dim=1) - math.log(u - 1)).mean()


def unit_embedding(a: torch.Tensor) -> torch.Tensor:
    """Flatten a map (B, d, h, w) and L2-normalise it: the vector x of the paper (footnote 2)."""
    return F.normalize(a.reshape(a.shape[0], -1), dim=1)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (deterministic in ``seed``): (N, D) -> centres (k, D).

    With fewer than ``k`` points, the missing centres are copies of points plus a small seeded jitter.
    """
    g = torch.Generator().manual_seed(int(seed))
    x = x.detach().float().cpu()
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point (no normal training features?)")
    if n <= k:
        extra = x[torch.randint(n, (k - n,), generator=g)]
        scale = x.std(0, unbiased=False).mean().clamp_min(1e-3) * 0.05
        return torch.cat([x, extra + scale * torch.randn(extra.shape, generator=g)])
    centres = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        idx = torch.multinomial(probs, 1, generator=g)
        centres.append(x[idx].squeeze(0))
        d2 = torch.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        new = new / counts.clamp_min(1)[:, None]
        new[empty] = c[empty]
        if torch.allclose(new, c):
            break
        c = new
    return c


# ----------------------------------------------------------------------------------------------------
# Multi-Gaussian prototypes and the light Schrodinger bridge
# ----------------------------------------------------------------------------------------------------


class GaussianPrototypes(nn.Module):
    """C diagonal Gaussian prototypes: the potential ``phi_1(y) = sum_c alpha_c N(y; mu_c, eps S_c)`` and the
    closed forms of the light Schrodinger bridge to it (LightSB; DPDL Eqs. 8-17).

    Parameters: ``mu`` (C, D), ``log_s`` (C, D) = log of the diagonal of S_c, ``alpha_logits`` (C,)
    (log alpha = log_softmax). ``eps`` is the bridge's entropic regularisation (Wiener volatility).
    """

    def __init__(self, n_prototypes: int, dim: int, eps: float = 1e-3, s_init: float = 1.0):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.eps = float(eps)
        self.mu = nn.Parameter(torch.randn(n_prototypes, dim) / math.sqrt(dim))
        self.log_s = nn.Parameter(torch.full((n_prototypes, dim), math.log(s_init)))
        self.alpha_logits = nn.Parameter(torch.zeros(n_prototypes))

    @property
    def n_prototypes(self) -> int:
        return self.mu.shape[0]

    @property
    def dim(self) -> int:
        return self.mu.shape[1]

    def log_alpha(self) -> torch.Tensor:
        return torch.log_softmax(self.alpha_logits, dim=0)

    @torch.no_grad()
    def init_means(self, features: torch.Tensor, seed: int = 0, iters: int = 25) -> None:
        """Vector quantisation (Eq. 15): k-means centres of ``features`` become the means; S = s_init."""
        self.mu.copy_(kmeans(features, self.n_prototypes, iters=iters, seed=seed).to(self.mu))

    # -- closed forms

    def component_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C): ``log alpha_c + (mu_c.x + x^T S_c x / 2) / eps`` (log of Eq. 13's alpha-tilde)."""
        s = self.log_s.exp()
        return self.log_alpha() + (x @ self.mu.T + 0.5 * (x * x) @ s.T) / self.eps

    def log_partition(self, x: torch.Tensor) -> torch.Tensor:
        """``log varpi(x) = log int exp(<x, y>/eps) phi_1(y) dy`` (B,), exact for the Gaussian mixture."""
        return torch.logsumexp(self.component_logits(x), dim=1)

    def component_log_density(self, y: torch.Tensor) -> torch.Tensor:
        """(B, C): ``log N(y; mu_c, eps S_c)`` (diagonal)."""
        log_var = math.log(self.eps) + self.log_s  # (C, D)
        inv = torch.exp(-log_var)
        # sum_d (y - mu)^2 / var expanded into matmuls: no (B, C, D) tensor
        maha = (y * y) @ inv.T - 2 * y @ (self.mu * inv).T + (self.mu * self.mu * inv).sum(1)[None]
        return -0.5 * (LOG_2PI * self.dim + log_var.sum(1)[None] + maha.clamp_min(0))

    def log_potential(self, y: torch.Tensor) -> torch.Tensor:
        """``log phi_1(y)`` (B,), the prototype mixture density."""
        return torch.logsumexp(self.log_alpha() + self.component_log_density(y), dim=1)

    def conditional(self, x: torch.Tensor):
        """The conditional plan of Eq. 13: (log weights (B, C), means (B, C, D), variances (C, D))."""
        s = self.log_s.exp()
        log_w = torch.log_softmax(self.component_logits(x), dim=1)
        means = self.mu[None] + s[None] * x[:, None, :]
        return log_w, means, self.eps * s

    def bridge_map(self, x: torch.Tensor) -> torch.Tensor:
        """psi_p(x): the conditional mean ``E[y | x] = sum_c w_c(x) (mu_c + S_c x)`` (deterministic)."""
        w = torch.softmax(self.component_logits(x), dim=1)  # (B, C)
        return w @ self.mu + (w @ self.log_s.exp()) * x

    def nearest(self, y: torch.Tensor) -> torch.Tensor:
        """``c* = argmax_c N(y; mu_c, eps S_c)`` (B,) (no gradient through the choice)."""
        with torch.no_grad():
            return self.component_log_density(y).argmax(1)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 22's input: ``(psi_p(x) - mu_c*) / sigma_c*`` with sigma the standard deviation ``sqrt(eps S)``."""
        y = self.bridge_map(x)
        c = self.nearest(y)
        return (y - self.mu[c]) / torch.sqrt(self.eps * self.log_s[c].exp())

    def prototype_term(self) -> torch.Tensor:
        """``1/C sum_c log phi_1(mu_c)`` (the second term of Eq. 16)."""
        return self.log_potential(self.mu).mean()

    def normal_loss(self, x_normal: torch.Tensor) -> torch.Tensor:
        """Eq. 16: ``1/N sum_i log varpi(x_i^n) - 1/C sum_c log phi_1(mu_c)``."""
        return self.log_partition(x_normal).mean() - self.prototype_term()

    def anomaly_loss(self, x_anomaly: torch.Tensor) -> torch.Tensor:
        """Eq. 17: ``1/C sum_c log phi_1(mu_c) - 1/M sum_i log varpi(x_i^a)``."""
        return self.prototype_term() - self.log_partition(x_anomaly).mean()

    def transport_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample objective of DPL: ``1/C sum_c log phi_1(mu_c) - log varpi(x)`` (B,).

        Eq. 16 maximises it for normals, Eq. 17 minimises it for anomalies. It is the log conditional plan
        density (Eq. 12) of landing on the prototypes, without the inner-product term <x, mu>/eps that
        LightSB's loss drops.
        """
        return self.prototype_term() - self.log_partition(x)

    # -- the SDE (Eq. 14) and its sampler

    def drift(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Closed-form drift ``g(x, t) = eps grad_x log int N(y | x, (1-t) eps I) exp(|y|^2/2eps) phi_1(y) dy``.

        Diagonal version of LightSB's ``get_drift`` (computed in float64): per dimension and component,
        ``a = (t/(1-t) + 1/S)/eps``, ``b = x/((1-t)eps) + mu/(eps S)``, ``grad = b/(a (1-t) eps) - x/((1-t) eps)``,
        averaged over the components' posterior weights. At t = 0 it equals ``E[y|x] - x``.
        """
        if not 0.0 <= t < 1.0:
            raise ValueError(f"t must lie in [0, 1), got {t}")
        dtype = torch.float64
        x = x.to(dtype)
        eps = self.eps
        mu = self.mu.detach().to(dtype)
        s = self.log_s.detach().to(dtype).exp()
        tau = (1.0 - t) * eps
        a = (t / (1.0 - t) + 1.0 / s) / eps  # (C, D)
        b = x[:, None, :] / tau + (mu / (eps * s))[None]  # (B, C, D)
        log_h = (
            -0.5 * torch.log(eps * s).sum(1)[None]
            - 0.5 * torch.log(a).sum(1)[None]
            + (b * b / (2 * a[None]) - mu[None] ** 2 / (2 * eps * s[None])).sum(2)
            + self.log_alpha().detach().to(dtype)[None]
        )  # (B, C) up to terms that do not depend on c
        log_h = log_h - (x * x).sum(1, keepdim=True) / (2 * tau)
        r = torch.softmax(log_h, dim=1)  # (B, C)
        grad = (r[:, :, None] * (b / (a[None] * tau))).sum(1) - x / tau
        return eps * grad

    def sample_bridge(self, x0: torch.Tensor, n_steps: int = 50, seed: int = 0) -> torch.Tensor:
        """Euler-Maruyama trajectories of ``dx = g(x, t) dt + sqrt(eps) dW`` from ``x0`` at t = 0 to t = 1.

        Returns (n_steps + 1, B, D) in float64; the last slice samples the conditional plan pi(y | x0).
        """
        g = torch.Generator().manual_seed(int(seed))
        dt = 1.0 / n_steps
        x = x0.detach().to(torch.float64).cpu()
        path = [x]
        for k in range(n_steps):
            noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x = x + self.drift(x, k * dt).cpu() * dt + math.sqrt(self.eps * dt) * noise
            path.append(x)
        return torch.stack(path)


# ----------------------------------------------------------------------------------------------------
# Trunk and the DPDL network
# ----------------------------------------------------------------------------------------------------


class Trunk(nn.Module):
    """Trainable trunk on the frozen backbone's map: per-channel standardisation (statistics of the training
    normals, fitted in ``prepare``) -> 1x1 conv (C_in -> d) -> ReLU -> 1x1 conv (d -> d)."""

    def __init__(self, in_channels: int, feature_dim: int = 64):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("std", torch.ones(1, in_channels, 1, 1))
        self.net = nn.Sequential(nn.Conv2d(in_channels, feature_dim, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(feature_dim, feature_dim, 1))
        self.out_channels = feature_dim

    @torch.no_grad()
    def fit_stats(self, maps: torch.Tensor) -> None:
        maps = maps.float()
        self.mean.copy_(maps.mean(dim=(0, 2, 3), keepdim=True))
        self.std.copy_(maps.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-4))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net((maps.float() - self.mean) / self.std)


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


class DPDLNet(OpenSetModel):
    """DPDL on cached backbone maps (see the module docstring for every choice).

    Args:
        in_channels: channels of the backbone's deep tap.
        feature_dim: channels d of the trunk (the per-location features v of the MIL heads).
        n_prototypes: C (paper 32). eps: bridge epsilon (paper 1e-3). s_init: initial diagonal of S_c.
        kappa, lam: dispersion concentration and weight (paper 10, 0.01).
        topk_ratio: K of the top-K MIL as a fraction of the map (paper 0.1).
        heads: the enabled score heads, a subset of ("a", "n", "r") (Table 3 ablation).
        use_dpl / use_dfl: the DPL (Eqs. 16-17) and DFL (Eq. 19) losses ("w/o DPL", "w/o DFL" ablations).
        dpl_weight: weight of L_DPL^n + L_DPL^a; None = eps (the DPL terms measured in units of eps).
        dpl_pseudo: count CutMix pseudo anomalies as anomalies in Eq. 17.
        hidden: width of M_n's hidden layer. kmeans_iters: Lloyd iterations of the prototype initialisation.
    """

    def __init__(self, in_channels: int, feature_dim: int = 64, n_prototypes: int = 32, eps: float = 1e-3,
                 s_init: float = 1.0, kappa: float = 10.0, lam: float = 0.01, topk_ratio: float = 0.1,
                 heads: Sequence[str] = ("a", "n", "r"), use_dpl: bool = True, use_dfl: bool = True,
                 dpl_weight: float | None = None, dpl_pseudo: bool = True, hidden: int = 256,
                 kmeans_iters: int = 25):
        super().__init__()
        heads = tuple(heads)
        if not heads or set(heads) - {"a", "n", "r"}:
            raise ValueError(f"heads must be a non-empty subset of ('a', 'n', 'r'), got {heads}")
        self.config = dict(in_channels=in_channels, feature_dim=feature_dim, n_prototypes=n_prototypes, eps=eps,
                           s_init=s_init, kappa=kappa, lam=lam, topk_ratio=topk_ratio, heads=heads,
                           use_dpl=use_dpl, use_dfl=use_dfl, dpl_weight=dpl_weight, dpl_pseudo=dpl_pseudo,
                           hidden=hidden, kmeans_iters=kmeans_iters)
        self.trunk = Trunk(in_channels, feature_dim)
        self.feature_dim, self.n_prototypes, self.eps, self.s_init = feature_dim, n_prototypes, eps, s_init
        self.kappa, self.lam, self.topk_ratio, self.heads = kappa, lam, topk_ratio, heads
        self.use_dpl, self.use_dfl, self.dpl_pseudo = use_dpl, use_dfl, dpl_pseudo
        self.dpl_weight = eps if dpl_weight is None else float(dpl_weight)
        self.kmeans_iters = kmeans_iters
        self.head_a = nn.Conv2d(feature_dim, 1, 1)
        self.head_n = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        self.head_r = nn.Conv2d(feature_dim, 1, 1)
        self.prototypes: GaussianPrototypes | None = None
        self.map_size: tuple[int, int] | None = None

    # -- setup

    def prepare(self, normal_maps: torch.Tensor, seed: int = 0) -> None:
        """Fit the trunk's input statistics, build the prototypes for the map size, k-means their means."""
        self.trunk.fit_stats(normal_maps)
        self.map_size = tuple(int(v) for v in normal_maps.shape[-2:])
        dim = self.feature_dim * self.map_size[0] * self.map_size[1]
        self.prototypes = GaussianPrototypes(self.n_prototypes, dim, self.eps, self.s_init).to(normal_maps.device)
        with torch.no_grad():
            x = torch.cat([self.embed(chunk.float())[1] for chunk in normal_maps.split(256)])
        self.prototypes.init_means(x, seed=seed, iters=self.kmeans_iters)

    def _check(self, maps: torch.Tensor) -> None:
        if self.prototypes is None:
            raise RuntimeError("DPDLNet.prepare(normal_maps) must run before training or scoring")
        if tuple(maps.shape[-2:]) != self.map_size:
            raise ValueError(f"feature maps are {tuple(maps.shape[-2:])} but the prototypes were built for "
                             f"{self.map_size}: use one image size for training and testing")

    # -- forward pieces

    def embed(self, maps: torch.Tensor):
        """(a, x): the trunk's map (B, d, h, w) and the unit embedding x (B, D)."""
        a = self.trunk(maps)
        return a, unit_embedding(a)

    def heads_forward(self, a: torch.Tensor, x: torch.Tensor) -> dict:
        """Head logits (B,) of the enabled heads: ``s_a`` (anomaly), ``s_n`` (normality), ``s_r`` (residual)."""
        out = {}
        if "a" in self.heads:
            out["s_a"] = topk_mean(self.head_a(a), self.topk_ratio)
        if "n" in self.heads:
            out["s_n"] = self.head_n(a.mean(dim=(2, 3))).squeeze(1)
        if "r" in self.heads:
            r = self.prototypes.residual(x).reshape(a.shape)
            out["s_r"] = topk_mean(self.head_r(r), self.topk_ratio)
        return out

    @staticmethod
    def combine(parts: dict) -> torch.Tensor:
        """``S = S_a + S_r - S_n`` over the heads present."""
        total = 0
        for key, sign in (("s_a", 1.0), ("s_r", 1.0), ("s_n", -1.0)):
            if key in parts:
                total = total + sign * parts[key]
        return total

    def loss(self, maps: torch.Tensor, labels: torch.Tensor):
        """Eq. 23 on a batch: MIL (BCE) + dpl_weight (L_DPL^n + L_DPL^a) + lambda L_DFL."""
        self._check(maps)
        labels = labels.to(maps.device)
        a, x = self.embed(maps)
        target = (labels > 0).float()
        parts = self.heads_forward(a, x)
        terms = {}
        if "s_a" in parts:
            terms["mil_a"] = F.binary_cross_entropy_with_logits(parts["s_a"], target)
        if "s_n" in parts:
            terms["mil_n"] = F.binary_cross_entropy_with_logits(parts["s_n"], 1.0 - target)
        if "s_r" in parts:
            terms["mil_r"] = F.binary_cross_entropy_with_logits(parts["s_r"], target)
        total = sum(terms.values())
        if self.use_dpl:
            anomalous = labels > 0 if self.dpl_pseudo else labels == 1
            normal = labels == 0
            dpl = 0.0
            if normal.any():
                terms["dpl_n"] = self.prototypes.normal_loss(x[normal])
                dpl = dpl + terms["dpl_n"]
            if anomalous.any():
                terms["dpl_a"] = self.prototypes.anomaly_loss(x[anomalous])
                dpl = dpl + terms["dpl_a"]
            total = total + self.dpl_weight * dpl
        if self.use_dfl:
            terms["dfl"] = dispersion_loss(x, self.kappa)
            total = total + self.lam * terms["dfl"]
        return total, {k: float(v.detach()) for k, v in terms.items()}

    @torch.no_grad()
    def score(self, maps: torch.Tensor) -> torch.Tensor:
        self._check(maps)
        a, x = self.embed(maps.float())
        return self.combine(self.heads_forward(a, x))

    @torch.no_grad()
    def score_parts(self, maps: torch.Tensor) -> dict:
        """Per-head logits and the DPL log-partition for analysis (numpy arrays)."""
        self._check(maps)
        a, x = self.embed(maps.float())
        parts = self.heads_forward(a, x)
        parts["log_partition"] = self.prototypes.log_partition(x)
        parts["score"] = self.combine({k: v for k, v in parts.items() if k.startswith("s_")})
        return {k: v.cpu().numpy() for k, v in parts.items()}

    @torch.no_grad()
    def embeddings(self, maps: torch.Tensor) -> dict:
        """Unit embeddings x, their bridge images psi_p(x) and nearest prototypes (for the 2-D figures)."""
        self._check(maps)
        _, x = self.embed(maps.float())
        y = self.prototypes.bridge_map(x)
        return dict(x=x.cpu(), psi=y.cpu(), nearest=self.prototypes.nearest(y).cpu())


# ----------------------------------------------------------------------------------------------------
# Pseudo anomalies (CutMix as in DRA)
# ----------------------------------------------------------------------------------------------------


def cutmix_pseudo_anomaly(image: torch.Tensor, generator: torch.Generator, area=(0.02, 0.15),
                          aspect=(0.3, 1 / 0.3), jitter: float = 0.1) -> torch.Tensor:
    """DRA's CutMix pseudo anomaly on one image (3, H, W) in [0, 1]: cut a patch of area ratio U(area) and
    log-uniform aspect ratio, jitter its brightness, contrast and saturation by +-``jitter`` (DRA's
    ColorJitter(0.1, 0.1, 0.1, 0.1); hue is left out), paste it at another random location of the same image."""

    def u(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    _, h, w = image.shape
    ratio = u(*area) * h * w
    ar = math.exp(u(math.log(aspect[0]), math.log(aspect[1])))
    ph = int(min(h - 1, max(1, round(math.sqrt(ratio * ar)))))
    pw = int(min(w - 1, max(1, round(math.sqrt(ratio / ar)))))
    y0, x0 = int(u(0, h - ph)), int(u(0, w - pw))
    y1, x1 = int(u(0, h - ph)), int(u(0, w - pw))
    patch = image[:, y0:y0 + ph, x0:x0 + pw].clone()
    patch = patch * u(1 - jitter, 1 + jitter)
    mean = patch.mean()
    patch = (patch - mean) * u(1 - jitter, 1 + jitter) + mean
    gray = patch.mean(0, keepdim=True)
    patch = (patch - gray) * u(1 - jitter, 1 + jitter) + gray
    out = image.clone()
    out[:, y1:y1 + ph, x1:x1 + pw] = patch.clamp(0, 1)
    return out


# ----------------------------------------------------------------------------------------------------
# Cached backbone maps
# ----------------------------------------------------------------------------------------------------


class MapCache:
    """Backbone maps at one tap for samples, computed once and kept (float16 by default) across runs.

    ``extractor`` is any module returning a list of maps (a :class:`lib.backbones.FeatureExtractor` or a test
    stand-in); ``tap`` indexes that list (-1: the last, the deep tap). ``resize``/``crop`` are the
    :class:`lib.data.AnomalyDataset` geometry. Pseudo-anomaly maps are of CutMix images seeded by
    ``(path, box, variant)`` only, so every run shares them.
    """

    def __init__(self, extractor: Callable, resize=224, crop=None, tap: int = -1, batch_size: int = 16,
                 dtype=torch.float16, device="cpu", show_progress: bool = False, path=None):
        self.extractor, self.resize, self.crop, self.tap = extractor, resize, crop, tap
        self.batch_size, self.dtype, self.device, self.show_progress = batch_size, dtype, torch.device(device), show_progress
        self._maps: dict = {}
        self.seconds = 0.0
        self.path = path
        if path is not None:
            from pathlib import Path

            if Path(path).is_file():
                stored = torch.load(path, map_location="cpu", weights_only=False)
                if stored.get("identity") == self.identity():
                    self._maps = stored["maps"]

    def identity(self) -> dict:
        """What the maps depend on (checked when a saved cache is loaded): backbone, geometry, tap."""
        norm = getattr(self.extractor, "normalization", None)
        return dict(extractor=str(norm if norm is not None else type(self.extractor).__name__),
                    resize=str(self.resize), crop=str(self.crop), tap=self.tap, dtype=str(self.dtype))

    def save(self, path=None):
        """Write the maps (atomically) to ``path`` (default: the ``path`` given at construction)."""
        path = path or self.path
        if path is None:
            raise ValueError("MapCache.save needs a path")
        return torch_save(dict(identity=self.identity(), maps=self._maps), path)

    def __len__(self) -> int:
        return len(self._maps)

    @staticmethod
    def key(sample, variant: int | None = None):
        return (sample.path, tuple(sample.box) if sample.box else None, variant)

    def _images(self, samples):
        return AnomalyDataset(samples, resize=self.resize, crop=self.crop)

    def _compute(self, samples, variant: int | None):
        if not samples:
            return
        start = time.perf_counter()
        dataset = self._images(samples)
        batches = range(0, len(samples), self.batch_size)
        if self.show_progress:
            batches = progress(batches, desc="backbone maps" + (" (pseudo)" if variant is not None else ""))
        for lo in batches:
            idx = range(lo, min(lo + self.batch_size, len(samples)))
            images = []
            for i in idx:
                img = dataset[i]["image"]
                if variant is not None:
                    s = samples[i]
                    # keyed by the last path parts, not the absolute path: the same pseudo anomalies everywhere
                    key = "/".join(Path(s.path).parts[-3:])
                    g = torch.Generator().manual_seed(stable_hash("cutmix", key, s.box, variant))
                    img = cutmix_pseudo_anomaly(img, g)
                images.append(img)
            with torch.no_grad():
                maps = self.extractor(torch.stack(images).to(self.device))[self.tap]
            for i, m in zip(idx, maps):
                self._maps[self.key(samples[i], variant)] = m.detach().to("cpu", self.dtype)
        self.seconds += time.perf_counter() - start

    def maps(self, samples, variant: int | None = None) -> torch.Tensor:
        """Stacked maps (N, C, h, w) of ``samples`` (computing the missing ones)."""
        samples = list(samples)
        missing, seen = [], set()
        for s in samples:
            k = self.key(s, variant)
            if k not in self._maps and k not in seen:
                missing.append(s)
                seen.add(k)
        self._compute(missing, variant)
        if not samples:
            raise ValueError("no samples to stack")
        return torch.stack([self._maps[self.key(s, variant)] for s in samples])

    def pseudo_maps(self, samples, variants: int = 1) -> torch.Tensor:
        """Maps of ``variants`` CutMix pseudo anomalies per sample (N * variants, C, h, w)."""
        return torch.cat([self.maps(samples, variant=v) for v in range(variants)])


# ----------------------------------------------------------------------------------------------------
# Training engine (shared with the baselines)
# ----------------------------------------------------------------------------------------------------


@dataclass
class FeatureBank:
    """Training maps of one open-set run: normals, seen anomalies, pseudo anomalies (may be empty/None)."""

    normal: torch.Tensor
    anomaly: torch.Tensor
    pseudo: torch.Tensor | None = None


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


def _sample_batch(bank: FeatureBank, cfg: TrainConfig, use_pseudo: bool, g: torch.Generator):
    n_anom_avail = 0 if bank.anomaly is None else len(bank.anomaly)
    n_a = min(cfg.batch_size - 1, max(1, round(cfg.batch_size * cfg.anomaly_fraction))) if n_anom_avail else 0
    n_n = cfg.batch_size - n_a
    normal_idx = torch.randint(len(bank.normal), (n_n,), generator=g)
    maps = [bank.normal[normal_idx]]
    labels = [torch.zeros(n_n, dtype=torch.long)]
    if use_pseudo and bank.pseudo is not None and len(bank.pseudo) and cfg.pseudo_prob > 0:
        swap = torch.rand(n_n, generator=g) < cfg.pseudo_prob
        if swap.any():
            pidx = torch.randint(len(bank.pseudo), (int(swap.sum()),), generator=g)
            maps[0] = maps[0].clone()
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
    building the model to fix its initial weights too (:func:`lib.openset_baselines.run_openset` does).
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
        maps, labels = _sample_batch(bank, cfg, getattr(model, "uses_pseudo", True), g)
        loss, parts = model.loss(maps.to(device), labels.to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at step {step}: lower lr or dpl_weight")
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


# ----------------------------------------------------------------------------------------------------
# Analysis helpers for the notebook (2-D view of the prototypes and the bridge)
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def bridge_projection(model: DPDLNet, groups: dict, n_trajectories: int = 12, n_steps: int = 30, seed: int = 0,
                      max_per_group: int = 300) -> dict:
    """PCA (2-D) of the unit embeddings x, their bridge images psi_p(x) and the prototype means, plus
    Euler-Maruyama trajectories of the bridge from a few points of every group.

    ``groups``: {name: maps}. Returns dict(points=DataFrame[group, stage ("feature" | "bridged"), pc1, pc2],
    prototypes=(C, 2) array, trajectories={group: (n_steps + 1, n, 2) array}, explained=(2,) variance ratio).
    The PCA basis is fitted on all embeddings, bridge images and means together, so they share one plane.
    """
    g = torch.Generator().manual_seed(int(seed))
    emb = {}
    for name, maps in groups.items():
        if len(maps) > max_per_group:
            maps = maps[torch.randperm(len(maps), generator=g)[:max_per_group]]
        emb[name] = model.embeddings(maps)
    mu = model.prototypes.mu.detach().cpu()
    stacked = torch.cat([torch.cat([e["x"], e["psi"]]) for e in emb.values()] + [mu]).double()
    centre = stacked.mean(0, keepdim=True)
    _, sv, vt = torch.linalg.svd(stacked - centre, full_matrices=False)
    basis = vt[:2].T
    explained = (sv[:2] ** 2 / (sv ** 2).sum()).numpy()

    def proj(t):
        return ((t.double() - centre) @ basis).numpy()

    rows, traj = [], {}
    for name, e in emb.items():
        for stage, t in (("feature", e["x"]), ("bridged", e["psi"])):
            p = proj(t)
            rows.append(pd.DataFrame(dict(group=name, stage=stage, pc1=p[:, 0], pc2=p[:, 1])))
        starts = e["x"][:n_trajectories]
        path = model.prototypes.sample_bridge(starts, n_steps=n_steps, seed=seed)
        traj[name] = np.stack([proj(step) for step in path])
    return dict(points=pd.concat(rows, ignore_index=True), prototypes=proj(mu), trajectories=traj,
                explained=explained)
