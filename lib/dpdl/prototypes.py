"""DPDL's multi-Gaussian prototypes and the light Schrodinger bridge to them (LightSB closed forms; DPDL Eqs. 8-17,
22), with the bounded prototype losses of :mod:`lib.dpdl.model`.

Notation (the paper's, LightSB's parametrisation). Features x in R^D; C prototypes with weights alpha_c, means
mu_c and diagonal covariances sigma_c = eps S_c (LightSB writes the covariance as eps S, which keeps Eq. 13 finite
at the paper's eps = 1e-3). The target potential is the mixture

    phi_1(y) = sum_c alpha_c N(y; mu_c, eps S_c)                                             (Eq. 8)

and every bridge quantity is closed form, in the log domain (logsumexp):

- log-partition (Eq. 12's normaliser), Gaussian integral of exp(<x, y>/eps) phi_1(y):
  ``log varpi(x) = logsumexp_c [log alpha_c + (mu_c.x + x^T S_c x / 2) / eps]``
- conditional plan (Eq. 13): ``pi(y | x) = exp(<x, y>/eps) phi_1(y) / varpi(x)
  = sum_c w_c(x) N(y; mu_c + S_c x, eps S_c)``, ``w_c = softmax_c[log alpha_c + (mu_c.x + x^T S_c x/2)/eps]``
- drift of the bridge SDE (Eq. 14) and its Euler-Maruyama sampler; bridge map psi_p(x) = E[y | x].

Variance floor: ``S_c >= s_min`` (default 1e-3), applied as a clamp wherever S is used. Without it every
likelihood below is unbounded (a component collapsing onto one point has infinite density); with it
``log N(y; mu, eps S) <= -D/2 log(2 pi eps s_min)`` for every y, the bound :meth:`GaussianPrototypes.lower_bound`
returns.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["GaussianPrototypes", "kmeans"]

LOG_2PI = math.log(2 * math.pi)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0, return_assign: bool = False):
    """Lloyd's k-means with k-means++ seeding (deterministic in ``seed``): (N, D) -> centres (k, D).

    Needs ``N >= k`` points (raises a ValueError naming the fix otherwise). ``return_assign`` also returns the
    cluster index of every point.
    """
    g = torch.Generator().manual_seed(int(seed))
    x = x.detach().float().cpu()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}: lower the number of prototypes "
                         f"(n_prototypes, profile key dpdl.n_prototypes) to at most {n} or add training normals")
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
    return (c, torch.cdist(x, c).argmin(1)) if return_assign else c


class GaussianPrototypes(nn.Module):
    """C diagonal Gaussian prototypes ``phi_1`` and the light Schrodinger bridge to them (module docstring).

    Parameters: ``mu`` (C, D), ``log_s`` (C, D) = log of the diagonal of S_c, ``alpha_logits`` (C,)
    (log alpha = log_softmax). ``eps``: the bridge's entropic regularisation (Wiener volatility).
    ``s_init``: initial S (a number; :meth:`init_means` may replace it by the data's spread). ``s_min``: the
    variance floor (S_c >= s_min).
    """

    def __init__(self, n_prototypes: int, dim: int, eps: float = 1e-3, s_init: float = 1.0, s_min: float = 1e-3):
        super().__init__()
        if eps <= 0 or s_min <= 0:
            raise ValueError(f"eps and s_min must be positive, got eps={eps}, s_min={s_min}")
        self.eps, self.s_min = float(eps), float(s_min)
        self.mu = nn.Parameter(torch.randn(n_prototypes, dim) / math.sqrt(dim))
        self.log_s = nn.Parameter(torch.full((n_prototypes, dim), math.log(max(s_init, s_min))))
        self.alpha_logits = nn.Parameter(torch.zeros(n_prototypes))

    @property
    def n_prototypes(self) -> int:
        return self.mu.shape[0]

    @property
    def dim(self) -> int:
        return self.mu.shape[1]

    def s(self) -> torch.Tensor:
        """The diagonals S_c (C, D), floored at ``s_min``."""
        return self.log_s.exp().clamp_min(self.s_min)

    def log_alpha(self) -> torch.Tensor:
        return torch.log_softmax(self.alpha_logits, dim=0)

    @torch.no_grad()
    def init_means(self, features: torch.Tensor, seed: int = 0, iters: int = 25, spread: bool = False) -> None:
        """Vector quantisation (Eq. 15): the k-means centres of ``features`` become the means.

        ``spread=True`` also sets S_c to the mean squared distance per dimension of cluster c's members to its
        centre, divided by eps (so sigma_c = eps S_c is the cluster's isotropic variance), floored at s_min;
        clusters of one point get the average of the others. ``spread=False`` keeps S = s_init.
        """
        centres, assign = kmeans(features, self.n_prototypes, iters=iters, seed=seed, return_assign=True)
        self.mu.copy_(centres.to(self.mu))
        if spread:
            x = features.detach().float().cpu()
            d2 = ((x - centres[assign]) ** 2).mean(1)
            counts = torch.bincount(assign, minlength=self.n_prototypes)
            var = torch.zeros(self.n_prototypes).index_add_(0, assign, d2) / counts.clamp_min(1)
            ok = counts > 1
            fill = var[ok].mean() if ok.any() else d2.mean()
            var = torch.where(ok, var, fill)
            s = (var / self.eps).clamp_min(self.s_min)
            self.log_s.copy_(s.log()[:, None].expand_as(self.log_s).to(self.log_s))

    # -- closed forms

    def component_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C): ``log alpha_c + (mu_c.x + x^T S_c x / 2) / eps`` (log of Eq. 13's alpha-tilde)."""
        return self.log_alpha() + (x @ self.mu.T + 0.5 * (x * x) @ self.s().T) / self.eps

    def log_partition(self, x: torch.Tensor) -> torch.Tensor:
        """``log varpi(x) = log int exp(<x, y>/eps) phi_1(y) dy`` (B,), exact for the Gaussian mixture."""
        return torch.logsumexp(self.component_logits(x), dim=1)

    def component_log_density(self, y: torch.Tensor) -> torch.Tensor:
        """(B, C): ``log N(y; mu_c, eps S_c)`` (diagonal)."""
        log_var = math.log(self.eps) + self.s().log()  # (C, D)
        inv = torch.exp(-log_var)
        # sum_d (y - mu)^2 / var expanded into matmuls: no (B, C, D) tensor
        maha = (y * y) @ inv.T - 2 * y @ (self.mu * inv).T + (self.mu * self.mu * inv).sum(1)[None]
        return -0.5 * (LOG_2PI * self.dim + log_var.sum(1)[None] + maha.clamp_min(0))

    def log_potential(self, y: torch.Tensor) -> torch.Tensor:
        """``log phi_1(y)`` (B,), the prototype mixture density (Eq. 8)."""
        return torch.logsumexp(self.log_alpha() + self.component_log_density(y), dim=1)

    def conditional(self, x: torch.Tensor):
        """The conditional plan of Eq. 13: (log weights (B, C), means (B, C, D), variances (C, D))."""
        s = self.s()
        log_w = torch.log_softmax(self.component_logits(x), dim=1)
        return log_w, self.mu[None] + s[None] * x[:, None, :], self.eps * s

    def bridge_map(self, x: torch.Tensor) -> torch.Tensor:
        """psi_p(x): the conditional mean ``E[y | x] = sum_c w_c(x) (mu_c + S_c x)`` (deterministic)."""
        w = torch.softmax(self.component_logits(x), dim=1)  # (B, C)
        return w @ self.mu + (w @ self.s()) * x

    def assign(self, x: torch.Tensor, by: str = "bridge") -> torch.Tensor:
        """The responsible prototype c* (B,), no gradient through the choice.

        ``by="bridge"``: Eq. 22's ``c* = argmax_c N(psi_p(x); mu_c, eps S_c)`` (the prototype the bridge carries
        x to); ``by="mixture"``: the mixture's responsibility ``argmax_c alpha_c N(x; mu_c, eps S_c)``.
        """
        with torch.no_grad():
            if by == "bridge":
                return self.component_log_density(self.bridge_map(x)).argmax(1)
            if by == "mixture":
                return (self.log_alpha() + self.component_log_density(x)).argmax(1)
        raise ValueError(f"assign by 'bridge' or 'mixture', got {by!r}")

    def residual(self, x: torch.Tensor, mode: str = "prototype", assign: str = "bridge") -> torch.Tensor:
        """Eq. 22's input (B, D), the deviation from the responsible prototype in units of its scale.

        ``mode="prototype"`` (default): ``(x - mu_c*) / sqrt(eps S_c*)``, the feature's own deviation from its
        prototype, per dimension (reshaped to (d, h, w) it is a per-location residual map).

        ``mode="bridge"``: Eq. 22 literally, ``(psi_p(x) - mu_c*) / sqrt(eps S_c*)``. Degenerate: the plan's
        component means are ``mu_c + S_c x`` (Eq. 13), and at small eps the weights w_c(x) are one-hot, so
        ``psi_p(x) - mu_c* = S_c* x`` and the residual is ``sqrt(S_c*/eps) x``, a rescaled input in which the
        prototype means never appear. Kept for the ablation that shows it.
        """
        c = self.assign(x, assign)
        if mode == "prototype":
            y = x
        elif mode == "bridge":
            y = self.bridge_map(x)
        else:
            raise ValueError(f"residual mode must be 'prototype' or 'bridge', got {mode!r}")
        return (y - self.mu[c]) / torch.sqrt(self.eps * self.s()[c])

    # -- likelihoods of the DPL losses (per dimension)

    def log_likelihood(self, x: torch.Tensor, form: str = "mixture") -> torch.Tensor:
        """Per-dimension log-likelihood ell(x) (B,) of a feature under the prototypes (the DPL losses' unit).

        ``form="mixture"``: ``ell(x) = log phi_1(x) / D``, the density of x under the prototype mixture.

        ``form="bridge"``: ``ell(x) = log pi(x | x) / D``, the conditional plan (Eq. 12) evaluated at y = x,
        i.e. how likely the bridge leaves x where it is. From Eq. 12,
        ``log pi(x | x) = |x|^2/eps + log phi_1(x) - log varpi(x)``: this is Eq. 16's ``log varpi(x) -
        log phi_1(y)`` with the target sample y taken to be the normal feature itself (minus the constant
        |x|^2/eps of unit features). ``pi(. | x)`` is the mixture ``sum_c w_c N(mu_c + S_c x, eps S_c)``; it is
        high at x when ``x ~ mu_c + S_c x`` for the prototype the bridge picks, i.e. when x is a fixed point of
        the bridge (which S_c = 1, mu_c = 0 makes every x: see :mod:`lib.dpdl.model`).

        Both are mixtures of Gaussians with covariances >= eps s_min, so ``ell(x) <= -1/2 log(2 pi eps s_min)``.
        """
        if form == "mixture":
            ll = self.log_potential(x)
        elif form == "bridge":
            ll = (x * x).sum(1) / self.eps + self.log_potential(x) - self.log_partition(x)
        else:
            raise ValueError(f"DPL form must be 'bridge' or 'mixture', got {form!r}")
        return ll / self.dim

    def lower_bound(self) -> float:
        """``1/2 log(2 pi eps s_min)``: the smallest value ``-ell(x)`` can take (either form), so the bound of
        ``L_DPL^n``; ``L_DPL^a >= 0``."""
        return 0.5 * (LOG_2PI + math.log(self.eps * self.s_min))

    def normal_loss(self, x_normal: torch.Tensor, form: str = "mixture") -> torch.Tensor:
        """Eq. 16, bounded reading: ``L_DPL^n = -1/N sum_i ell(x_i^n)`` (>= :meth:`lower_bound`)."""
        return -self.log_likelihood(x_normal, form).mean()

    def anomaly_loss(self, x_anomaly: torch.Tensor, reference: torch.Tensor, margin: float = 1.0,
                     form: str = "mixture") -> torch.Tensor:
        """Eq. 17, bounded reading: ``L_DPL^a = 1/M sum_i max(0, ell(x_i^a) - (ref - margin))`` (>= 0).

        ``reference``: the normals' mean ell in the same batch, detached (a scalar tensor): anomalies are pushed
        until they are ``margin`` nats per dimension less likely than the normals, and no further.
        """
        return torch.relu(self.log_likelihood(x_anomaly, form) - (reference.detach() - margin)).mean()

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
        s = self.s().detach().to(dtype)
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
