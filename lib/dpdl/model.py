"""DPDL (Wang et al., CVPR 2025): distribution prototypes with a light Schrodinger bridge, dispersion learning and
MIL heads for open-set supervised anomaly detection, on the shared engine of :mod:`lib.dpdl.engine`.

No public code exists for DPDL; every choice the paper leaves open is a parameter of :class:`DPDLNet`.

Pipeline::

    cached backbone map --(trunk: standardise, 1x1 conv, ReLU, 1x1 conv)--> a (B, d, h, w)
    x = flatten(a) / ||flatten(a)||        (unit vector of dimension D = d*h*w, paper footnote 2)
    prototypes + bridge on x (Eqs. 8-17, lib.dpdl.prototypes), dispersion on x (Eq. 19), heads on a and x (Eqs. 20-22)

**The prototype losses (Eqs. 16, 17), and why not literally.** With P = 1/C sum_c log phi_1(mu_c), Eqs. 16 + 17
with Eq. 23's unit weights sum to ``[mean log varpi(x^n) - P] + [P - mean log varpi(x^a)]
= mean log varpi(x^n) - mean log varpi(x^a)``: the prototype terms cancel. Since ``d log varpi(x) / d mu_c =
w_c(x) x / eps``, descending it moves the prototypes *away* from the normals and *toward* the anomalies (the
reverse of Sec. 4.2's "align a normal with the closest prototype ... push anomaly samples away"), and it has no
lower bound (``mu_c -> -t x^n`` sends log varpi(x^n) to -inf). Eq. 16 alone is unbounded too: ``-log phi_1(mu_c)
<= -log alpha_c + D/2 log(2 pi) + 1/2 sum log(eps S_c) -> -inf`` as S_c -> 0.

Eq. 16 is LightSB's loss ``E_{x~p0} log varpi(x) - E_{y~p1} log phi_1(y)`` (= KL(pi* || pi_theta) + const), whose
second expectation runs over samples of a *fixed* target p1. Reading p1 as the prototype mixture itself (y drawn
from phi_1 with the prototypes held fixed on that side) does not repair it: at the current parameters
``E_{y~phi_1}[grad log phi_1(y)] = grad int phi_1 = 0``, so the gradient is that of mean log varpi(x^n) alone,
with the same wrong sign and no bound. That reading is therefore not implemented. What is implemented (both
bounded, both with the variance floor S_c >= s_min of :mod:`lib.dpdl.prototypes`):

- ``dpl_form="mixture"`` (default): the text's reading ("align a normal with the closest prototype with high
  likelihood"), ``L_DPL^n = -1/N sum_i log phi_1(x_i^n) / D``: the prototypes move onto the normals;
- ``dpl_form="bridge"``: the target samples of Eq. 16 are the normal features themselves (the bridge should
  leave a normal where it is): ``L_DPL^n = 1/N sum_i [log varpi(x_i^n) - log phi_1(x_i^n) - |x_i^n|^2/eps] / D
  = -1/N sum_i log pi(x_i^n | x_i^n) / D`` (Eq. 12 at y = x). Bounded too, but it has a trivial optimum: with
  S_c -> 1 and mu_c -> 0 the plan's means mu_c + S_c x equal x, the bridge becomes the identity and every
  feature is its own fixed point, whether or not a prototype sits near it (a toy run in tests/test_dpdl.py ends
  there). Kept as an option for comparison;
- Eq. 17 for either form: a hinge, ``L_DPL^a = 1/M sum_i max(0, ell(x_i^a) - (mean_j ell(x_j^n) - margin))`` with
  ell the per-dimension log-likelihood of the form and the normals' mean detached: anomalies are pushed until they
  are ``dpl_margin`` nats per dimension less likely than the batch's normals, and no further.

Log-likelihoods are divided by D (nats per dimension) so Eq. 23's unit weights put DPL on the scale of the MIL
losses (``dpl_weight`` = 1). Then, with MIL BCE >= 0, L_DPL^a >= 0 and L_DFL >= -kappa,
``L >= dpl_weight * 1/2 log(2 pi eps s_min) - lam * kappa`` (:meth:`DPDLNet.lower_bound`).

**The residual head M_r (Eq. 22).** Literally ``(psi_p(x) - mu_c*) / sigma_c*``; but the plan's means are
``mu_c + S_c x`` (Eq. 13), so for one-hot plan weights (eps = 1e-3) this is ``sqrt(S_c*/eps) x`` and the
prototype means never reach the score. Here (``residual="prototype"``) the residual is the feature's deviation
from its responsible prototype in units of that prototype's scale, ``r = (x - mu_c*) / sqrt(eps S_c*)``, with c*
chosen through the bridge as Eq. 22 says (``assign="bridge"``: argmax_c N(psi_p(x); mu_c, sigma_c)). r is reshaped
to (d, h, w) and scored per location like M_a; with ``residual_quadratic`` the 1x1 conv sees ``[r, r*r]`` (2d
channels), so a location's score can be its squared scaled distance to the prototype, not only a linear
function of it. ``residual="bridge"`` keeps Eq. 22 literally.

Other choices (parameters of :class:`DPDLNet`): ``feature_dim`` 64, C = 32, eps = 1e-3; ``s_init="data"``
starts each S_c at its k-means cluster's spread (the paper's "variances set to identity" would make
sigma_c = I, a thousand times the spread of unit features in D = 3136 dimensions); log-weights learnable via a
log-softmax; prototype means initialised by k-means (Eq. 15) of the normals' embeddings under the initial trunk;
``dpl_pseudo``: CutMix pseudo anomalies count as anomalies in Eq. 17 and in the MIL targets. MIL (Eqs. 20-22):
BCE-with-logits; M_a 1x1 conv + top-K (K = 10% of the map); M_n GAP -> FC(d, 256) -> ReLU -> FC(256, 1) trained on
*normality* (target 1 - y, as DRA's holistic head); score ``S = S_a + S_r - S_n`` over the enabled ``heads``.
Dispersion (Eq. 19) on the unit embeddings of every sample in the batch, kappa = 10, lambda = 0.01.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.dpdl.engine import FeatureBank, OpenSetModel, TrainConfig, Trunk, fit_model, score_maps, topk_mean
from lib.dpdl.features import MapCache, cutmix_pseudo_anomaly
from lib.dpdl.prototypes import GaussianPrototypes, kmeans

__all__ = [
    "DPDLNet",
    "DPL_FORMS",
    "FeatureBank",
    "GaussianPrototypes",
    "MapCache",
    "OpenSetModel",
    "TrainConfig",
    "Trunk",
    "bridge_projection",
    "cutmix_pseudo_anomaly",
    "dispersion_loss",
    "fit_model",
    "kmeans",
    "score_maps",
    "topk_mean",
    "unit_embedding",
]

DPL_FORMS = ("mixture", "bridge")


def dispersion_loss(features: torch.Tensor, kappa: float = 10.0) -> torch.Tensor:
    """Eq. 19: ``1/U sum_i log( 1/(U-1) sum_{j != i} exp(kappa <x_i, x_j>) )`` on unit-normalised features.

    Low when the features are spread over the hypersphere, high (= kappa) when they collapse to one direction;
    never below -kappa.
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


class DPDLNet(OpenSetModel):
    """DPDL on cached backbone maps (the module docstring derives every loss and choice).

    Args:
        in_channels: channels of the backbone's deep tap.
        feature_dim: channels d of the trunk (the per-location features v of the MIL heads).
        n_prototypes: C (paper 32); at most the number of training normals. eps: bridge epsilon (paper 1e-3).
        s_init: initial diagonal of S_c, a number or "data" (each cluster's spread / eps). s_min: variance floor.
        kappa, lam: dispersion concentration and weight (paper 10, 0.01).
        topk_ratio: K of the top-K MIL as a fraction of the map (paper 0.1).
        heads: the enabled score heads, a subset of ("a", "n", "r") (Table 3 ablation).
        use_dpl / use_dfl: the DPL (Eqs. 16-17) and DFL (Eq. 19) losses ("w/o DPL", "w/o DFL" ablations).
        dpl_weight: weight of L_DPL^n + L_DPL^a (Eq. 23: 1). dpl_form: "mixture" or "bridge" (module docstring).
        dpl_margin: the Eq. 17 hinge's margin in nats per dimension. dpl_pseudo: pseudo anomalies count in Eq. 17.
        residual: "prototype" (x - mu_c*) or "bridge" (Eq. 22 literally). assign: how c* is chosen, "bridge" or
        "mixture". residual_quadratic: M_r's 1x1 conv sees [r, r*r] instead of r.
        hidden: width of M_n's hidden layer. kmeans_iters: Lloyd iterations of the prototype initialisation.
        tail: partial fine-tuning, the backbone's last block(s) trained on cached earlier activations
        (:class:`lib.dpdl.engine.Trunk`); None = frozen backbone (default).
    """

    def __init__(self, in_channels: int, feature_dim: int = 64, n_prototypes: int = 32, eps: float = 1e-3,
                 s_init: float | str = "data", s_min: float = 1e-3, kappa: float = 10.0, lam: float = 0.01,
                 topk_ratio: float = 0.1, heads: Sequence[str] = ("a", "n", "r"), use_dpl: bool = True,
                 use_dfl: bool = True, dpl_weight: float = 1.0, dpl_form: str = "mixture", dpl_margin: float = 1.0,
                 dpl_pseudo: bool = True, residual: str = "prototype", assign: str = "bridge",
                 residual_quadratic: bool = True, hidden: int = 256, kmeans_iters: int = 25,
                 tail: nn.Module | None = None):
        super().__init__()
        heads = tuple(heads)
        if not heads or set(heads) - {"a", "n", "r"}:
            raise ValueError(f"heads must be a non-empty subset of ('a', 'n', 'r'), got {heads}")
        if dpl_form not in DPL_FORMS:
            raise ValueError(f"dpl_form must be one of {DPL_FORMS}, got {dpl_form!r}")
        if residual not in ("prototype", "bridge") or assign not in ("bridge", "mixture"):
            raise ValueError(f"residual must be 'prototype' or 'bridge' and assign 'bridge' or 'mixture', "
                             f"got {residual!r}, {assign!r}")
        if not (s_init == "data" or (isinstance(s_init, (int, float)) and s_init > 0)):
            raise ValueError(f"s_init must be a positive number or 'data', got {s_init!r}")
        if int(n_prototypes) < 1:
            raise ValueError(f"n_prototypes must be at least 1, got {n_prototypes}")
        self.config = dict(in_channels=in_channels, feature_dim=feature_dim, n_prototypes=n_prototypes, eps=eps,
                           s_init=s_init, s_min=s_min, kappa=kappa, lam=lam, topk_ratio=topk_ratio, heads=heads,
                           use_dpl=use_dpl, use_dfl=use_dfl, dpl_weight=dpl_weight, dpl_form=dpl_form,
                           dpl_margin=dpl_margin, dpl_pseudo=dpl_pseudo, residual=residual, assign=assign,
                           residual_quadratic=residual_quadratic, hidden=hidden, kmeans_iters=kmeans_iters)
        self.trunk = Trunk(in_channels, feature_dim, tail)
        self.feature_dim, self.n_prototypes, self.eps = feature_dim, int(n_prototypes), float(eps)
        self.s_init, self.s_min = s_init, float(s_min)
        self.kappa, self.lam, self.topk_ratio, self.heads = kappa, lam, topk_ratio, heads
        self.use_dpl, self.use_dfl, self.dpl_pseudo = use_dpl, use_dfl, dpl_pseudo
        self.dpl_weight, self.dpl_form, self.dpl_margin = float(dpl_weight), dpl_form, float(dpl_margin)
        self.residual_mode, self.assign_by, self.residual_quadratic = residual, assign, residual_quadratic
        self.kmeans_iters = kmeans_iters
        self.head_a = nn.Conv2d(feature_dim, 1, 1)
        self.head_n = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        self.head_r = nn.Conv2d(feature_dim * (2 if residual_quadratic else 1), 1, 1)
        self.prototypes: GaussianPrototypes | None = None
        self.map_size: tuple[int, int] | None = None  # of the trunk's output
        self.input_size: tuple[int, int] | None = None  # of the cached maps it takes

    # -- setup

    def prepare(self, normal_maps: torch.Tensor, seed: int = 0) -> None:
        """Fit the trunk's input statistics, build the prototypes for the map size, k-means their means (Eq. 15)."""
        if len(normal_maps) < self.n_prototypes:
            raise ValueError(f"n_prototypes={self.n_prototypes} exceeds the {len(normal_maps)} normal training "
                             f"features (one per image): lower n_prototypes to at most {len(normal_maps)} "
                             "(profile key dpdl.n_prototypes) or add training normals")
        self.trunk.fit_stats(normal_maps)
        self.input_size = tuple(int(v) for v in normal_maps.shape[-2:])
        with torch.no_grad():
            embedded = [self.embed(chunk.float()) for chunk in normal_maps.split(256)]
        # the trunk's map size, not the input's: a fine-tuned tail may change it (images -> stride 32)
        self.map_size = tuple(int(v) for v in embedded[0][0].shape[-2:])
        dim = self.feature_dim * self.map_size[0] * self.map_size[1]
        s0 = 1.0 if self.s_init == "data" else float(self.s_init)
        self.prototypes = GaussianPrototypes(self.n_prototypes, dim, self.eps, s0, self.s_min).to(normal_maps.device)
        x = torch.cat([unit for _, unit in embedded])
        self.prototypes.init_means(x, seed=seed, iters=self.kmeans_iters, spread=self.s_init == "data")

    def _check(self, maps: torch.Tensor) -> None:
        if self.prototypes is None:
            raise RuntimeError("DPDLNet.prepare(normal_maps) must run before training or scoring")
        if tuple(maps.shape[-2:]) != self.input_size:
            raise ValueError(f"inputs are {tuple(maps.shape[-2:])} but the prototypes were built for "
                             f"{self.input_size}: use one image size for training and testing")

    def lower_bound(self) -> float:
        """The smallest value :meth:`loss` can take: ``dpl_weight/2 log(2 pi eps s_min) - lam kappa`` (docstring)."""
        bound = 0.5 * (math.log(2 * math.pi) + math.log(self.eps * self.s_min))
        return (self.dpl_weight * bound if self.use_dpl else 0.0) - (self.lam * self.kappa if self.use_dfl else 0.0)

    # -- forward pieces

    def embed(self, maps: torch.Tensor):
        """(a, x): the trunk's map (B, d, h, w) and the unit embedding x (B, D)."""
        a = self.trunk(maps)
        return a, unit_embedding(a)

    def residual_map(self, x: torch.Tensor, shape) -> torch.Tensor:
        """Eq. 22's residual reshaped to the map (B, d, h, w) (with ``residual_quadratic``: [r, r*r], 2d channels)."""
        r = self.prototypes.residual(x, self.residual_mode, self.assign_by).reshape(shape)
        return torch.cat([r, r * r], dim=1) if self.residual_quadratic else r

    def heads_forward(self, a: torch.Tensor, x: torch.Tensor) -> dict:
        """Head logits (B,) of the enabled heads: ``s_a`` (anomaly), ``s_n`` (normality), ``s_r`` (residual)."""
        out = {}
        if "a" in self.heads:
            out["s_a"] = topk_mean(self.head_a(a), self.topk_ratio)
        if "n" in self.heads:
            out["s_n"] = self.head_n(a.mean(dim=(2, 3))).squeeze(1)
        if "r" in self.heads:
            out["s_r"] = topk_mean(self.head_r(self.residual_map(x, a.shape)), self.topk_ratio)
        return out

    @staticmethod
    def combine(parts: dict) -> torch.Tensor:
        """``S = S_a + S_r - S_n`` over the heads present."""
        total = 0
        for key, sign in (("s_a", 1.0), ("s_r", 1.0), ("s_n", -1.0)):
            if key in parts:
                total = total + sign * parts[key]
        return total

    def dpl_terms(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        """``dpl_n`` (Eq. 16) and ``dpl_a`` (Eq. 17) of a batch, bounded forms (module docstring)."""
        anomalous = labels > 0 if self.dpl_pseudo else labels == 1
        normal = labels == 0
        terms = {}
        if normal.any():
            ll_n = self.prototypes.log_likelihood(x[normal], self.dpl_form)
            terms["dpl_n"] = -ll_n.mean()
            if anomalous.any():
                terms["dpl_a"] = self.prototypes.anomaly_loss(x[anomalous], ll_n.mean(), self.dpl_margin,
                                                              self.dpl_form)
        return terms

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
            dpl = self.dpl_terms(x, labels)
            terms.update(dpl)
            total = total + self.dpl_weight * sum(dpl.values())
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
        """Per-head logits and the per-dimension prototype log-likelihood ``ell`` (numpy arrays)."""
        self._check(maps)
        a, x = self.embed(maps.float())
        parts = self.heads_forward(a, x)
        parts["log_likelihood"] = self.prototypes.log_likelihood(x, self.dpl_form)
        parts["score"] = self.combine({k: v for k, v in parts.items() if k.startswith("s_")})
        return {k: v.cpu().numpy() for k, v in parts.items()}

    @torch.no_grad()
    def embeddings(self, maps: torch.Tensor) -> dict:
        """Unit embeddings x, their bridge images psi_p(x) and responsible prototypes (for the 2-D figures)."""
        self._check(maps)
        _, x = self.embed(maps.float())
        return dict(x=x.cpu(), psi=self.prototypes.bridge_map(x).cpu(),
                    nearest=self.prototypes.assign(x, self.assign_by).cpu())


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
