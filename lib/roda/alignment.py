"""Distribution-alignment losses between target patch features and the source memory bank (RoDA Tab. 4).

Every loss has the signature ``loss_fn(target, bank, **options) -> (loss, info)``:

- ``target``: (N, D) target patch features of the current minibatch, carrying the gradient (the BN affine
  parameters being adapted sit upstream of them);
- ``bank``: (M, D) the fixed source memory bank (treated as a constant: detached);
- ``loss``: a scalar tensor; ``info``: a dict of python numbers for logging (plus, for the OT losses, the
  potentials and optionally the plan/pairs as tensors).

Losses:

- :func:`roda_loss` - robust Sinkhorn distance, RoDA Eq. 5 + Eq. 6 (discretized plan);
- :func:`continuous_ot_loss` - Sinkhorn distance with the continuous plan (Tab. 4 "Continuous");
- :func:`hungarian_loss` - one-to-one linear assignment (Tab. 4 "Hun. Method");
- :func:`moment_matching_loss` - TTT++'s mean/covariance matching, RoDA Eq. 3;
- :func:`gaussian_kl_loss` - TTAC's symmetric KL between Gaussians fitted to source and target.

The OT losses share one pattern: the plan (or assignment) is computed from the *detached* cost and held fixed,
and the gradient reaches ``target`` only through the cost ``C(target)``. For the continuous plan this is the
envelope-theorem gradient of the OT value. Source statistics always come from the bank only (the source
images are not revisited); :func:`source_stats` precomputes them once per bank.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lib.common.utils import scratch
from lib.ot.transport import (
    assignment_stats,
    cost_scale,
    discretize,
    hungarian_assignment,
    paired_cost,
    pairwise_cost,
    sinkhorn,
)

__all__ = [
    "ALIGNMENT_LOSSES",
    "SourceStats",
    "continuous_ot_loss",
    "gaussian_kl_loss",
    "hungarian_loss",
    "moment_matching_loss",
    "roda_loss",
    "source_stats",
]


def _prepare(target: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    if target.dim() != 2:
        raise ValueError(f"target features must be (N, D), got shape {tuple(target.shape)}")
    if bank is None or bank.dim() != 2:
        raise ValueError(f"the memory bank must be (M, D), got {None if bank is None else tuple(bank.shape)}")
    if target.shape[0] == 0:
        raise ValueError("no target features: is the target minibatch empty?")
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    if target.shape[1] != bank.shape[1]:
        raise ValueError(f"feature dims differ: target D={target.shape[1]}, bank D={bank.shape[1]}")
    return bank.detach().to(device=target.device, dtype=target.dtype)


# ----------------------------------------------------------------------------------------------------------
# optimal-transport losses
# ----------------------------------------------------------------------------------------------------------


def _plan(C, eps, cost_norm, sinkhorn_kwargs, overwrite=False):
    """Plan of the detached cost at ``eps`` relative to its ``cost_norm`` scale; returns (log plan, sinkhorn
    info, cost scale). The plan of ``(C / s, eps)`` is the plan of ``(C, eps * s)``: the cost is not copied to
    normalise it (potentials in ``info`` are in the units of ``C``)."""
    s = float(cost_scale(C.detach(), cost_norm).reshape(-1)[0])
    if not math.isfinite(s):  # finite features whose squared distances overflow: the encoder has run away
        raise FloatingPointError(f"the cost scale ({cost_norm}) is {s}: the features are too large (diverged "
                                 "adaptation? lower lr)")
    kw = dict(sinkhorn_kwargs or {})
    kw["return_log"] = True  # argmaxes and the loss read the log plan (exact, no underflow)
    if kw.get("rho") is not None:
        kw["rho"] = kw["rho"] * s
    plan, info = sinkhorn(C.detach(), eps * s, overwrite=overwrite, **kw)
    return plan, info, s


def _bank_marginal(bank_weights, M):
    """Column marginal ``b`` from per-entry weights (e.g. the training patches each bank entry covers)."""
    if bank_weights is None:
        return None
    w = torch.as_tensor(bank_weights, dtype=torch.float32).reshape(-1)
    if w.numel() != M:
        raise ValueError(f"bank_weights has {w.numel()} entries but the bank has {M}: the weights belong to "
                         "another bank; recompute them for this bank (lib.experiments.roda_grid.bank_weights)")
    if not torch.isfinite(w).all() or (w <= 0).any():
        raise ValueError("bank_weights must be finite and > 0 (every entry covers at least itself)")
    return w / w.sum()


def roda_loss(
    target: torch.Tensor,
    bank: torch.Tensor,
    eps: float = 0.05,
    cost: str = "l2",
    cost_norm: str = "mean",
    rule: str = "or",
    reduction: str = "mean",
    bank_weights=None,
    mass_fraction: float = 0.5,
    anomalous_rows=None,
    return_plan: bool = False,
    sinkhorn_kwargs: dict | None = None,
):
    """Robust Sinkhorn distance, RoDA Eq. 5-6 (and the label-free robust variant, same function).

    1. ``C = cost(target, bank)`` (N, M) (``C_ij = ||z_i - m_j||`` for ``cost="l2"``), without gradient;
    2. ``gamma*`` = entropic OT plan (Eq. 5) at ``eps`` relative to the ``cost_norm`` scale of ``C``
       (``"none"``: ``eps`` in cost units). Marginals: uniform (Eq. 4), or ``b_j ~ bank_weights_j`` (the
       training patches bank entry ``j`` stands for); ``sinkhorn_kwargs=dict(method="semi_relaxed", rho=...)``
       relaxes the target marginal (``rho`` on the same scale as ``eps``);
    3. ``pi*`` = discretization of ``gamma*`` by ``rule`` (Eq. 6 is ``"or"``; ``"mass"`` keeps row pairs
       holding at least ``mass_fraction`` of the median row pair's mass; :func:`lib.ot.transport.discretize`);
    4. ``loss = sum_ij pi_ij C_ij / sum_ij pi_ij`` (``reduction="mean"``) or ``sum_ij pi_ij C_ij`` (``"sum"``,
       Eq. 6 literally).

    The kept pairs' costs are recomputed from the feature differences with gradient
    (:func:`lib.ot.transport.paired_cost`): no (N, M) autograd graph. ``sinkhorn_kwargs`` go to
    :func:`lib.ot.sinkhorn.sinkhorn` (``tol``, ``max_iter``, ``init``, ``method``, ``rho``); to warm-start the next
    minibatch pass ``init=(None, info["potentials"][1])`` (bank-side potentials, cost units).

    Returns ``(loss, info)`` with ``n_pairs, n_rows, share_rows_assigned`` (rows that are some bank column's
    argmax), ``share_rows_in_pairs, share_row_argmax_nn`` (rows whose plan argmax is their nearest bank entry),
    ``nn_distance`` (mean nearest-bank distance of the batch, the stopping rule's signal), ``sinkhorn_iters,
    marginal_error, converged, cost_scale, eps_cost`` (eps in cost units), ``potentials`` and, with
    ``anomalous_rows`` the Fig. 5a counts, with ``return_plan`` ``plan`` and ``pairs``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'sum'")
    bank = _prepare(target, bank)
    b = _bank_marginal(bank_weights, bank.shape[0])
    kw = dict(sinkhorn_kwargs or {})
    if b is not None:
        kw["b"] = b.to(target.device)
    with torch.no_grad():
        # the cost (then the log plan, in the same storage) lives for this call only: a reused buffer on CPU
        out = None if return_plan or cost == "cosine" else scratch("roda_loss.cost", (target.shape[0], bank.shape[0]),
                                                                   target.dtype, target.device)
        C = pairwise_cost(target.detach(), bank, cost, out=out)
        nn_dist, nn_idx = C.min(1)
        log_plan, sk, scale = _plan(C, eps, cost_norm, kw, overwrite=not return_plan)
    del C
    pairs = discretize(log_plan, rule, mass_fraction=mass_fraction, log_plan=True)
    # the loss needs the cost of the kept pairs only: recompute those exactly, with gradient
    picked = paired_cost(target[pairs.rows], bank[pairs.cols], cost)
    loss = picked.mean() if reduction == "mean" else picked.sum()
    stats = assignment_stats(pairs, anomalous_rows)
    info = dict(
        n_pairs=stats["n_pairs"],
        n_rows=stats["n_rows"],
        share_rows_assigned=stats["share_rows_col_argmax"],
        share_rows_in_pairs=stats["share_rows_in_pairs"],
        share_row_argmax_nn=float((pairs.row_argmax == nn_idx).float().mean()),
        nn_distance=float(nn_dist.mean()),
        sinkhorn_iters=sk["n_iter"],
        marginal_error=sk["marginal_error"],
        converged=sk["converged"],
        cost_scale=scale,
        eps_cost=eps * scale,
        potentials=(sk["f"], sk["g"]),
    )
    if anomalous_rows is not None:
        info.update({k: v for k, v in stats.items() if "anomalous" in k})
        an = torch.as_tensor(anomalous_rows, device=pairs.rows.device).bool().reshape(-1)
        kept = torch.zeros_like(an)
        kept[pairs.rows] = True
        info["n_anomalous_kept"] = int((kept & an).sum())
        info["share_anomalous_kept"] = float((kept & an).sum()) / max(1, int(an.sum()))
        info["share_normal_kept"] = float((kept & ~an).sum()) / max(1, int((~an).sum()))
    if return_plan:
        info["plan"] = log_plan.exp_()
        info["pairs"] = pairs
    return loss, info


def continuous_ot_loss(
    target: torch.Tensor,
    bank: torch.Tensor,
    eps: float = 0.05,
    cost: str = "l2",
    cost_norm: str = "mean",
    reduction: str = "mean",
    return_plan: bool = False,
    sinkhorn_kwargs: dict | None = None,
):
    """Sinkhorn distance with the continuous plan (RoDA Tab. 4 "Continuous"): ``sum_ij gamma*_ij C_ij``.

    ``gamma*`` (Eq. 5) is computed from the detached normalised cost and held fixed (envelope gradient:
    ``d/dC`` of the entropic OT value at the optimum is ``gamma*``). Every row of ``gamma*`` carries mass
    ``1/N``, so ``sum_ij gamma_ij C_ij = (1/N) sum_i E_{j ~ gamma_i.}[C_ij]`` is already the plan-weighted
    *mean* cost per target patch: ``reduction="mean"`` returns it, on the scale of :func:`roda_loss`'s default
    ``"mean"``; ``reduction="sum"`` returns ``N * sum_ij gamma_ij C_ij`` (the sum over target patches), on the
    scale of :func:`roda_loss` with ``"sum"`` (Eq. 6 literal, N to N + M pairs). Same ``reduction`` in both
    losses = comparable loss values and gradient magnitudes.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'sum'")
    bank = _prepare(target, bank)
    C = pairwise_cost(target, bank, cost)
    log_plan, sk, scale = _plan(C, eps, cost_norm, sinkhorn_kwargs)
    plan = log_plan.exp_().to(C.dtype)
    loss = (plan * C).sum()
    if reduction == "sum":
        loss = C.shape[0] * loss
    info = dict(
        sinkhorn_iters=sk["n_iter"],
        marginal_error=sk["marginal_error"],
        converged=sk["converged"],
        cost_scale=scale,
        potentials=(sk["f"], sk["g"]),
    )
    if return_plan:
        info["plan"] = plan
    return loss, info


def hungarian_loss(
    target: torch.Tensor,
    bank: torch.Tensor,
    cost: str = "l2",
    mode: str = "subsample",
    seed: int = 0,
    return_pairs: bool = False,
):
    """Mean cost of a one-to-one linear assignment (RoDA Tab. 4 "Hun. Method").

    The assignment comes from :func:`lib.ot.transport.hungarian_assignment` on the detached cost (``mode``:
    ``"subsample"`` matches a random subset of ``M`` target rows when ``N > M``, ``"tile"`` lets every bank
    entry serve ``ceil(N/M)`` rows). ``loss = mean_k C[rows_k, cols_k]``.
    """
    bank = _prepare(target, bank)
    with torch.no_grad():
        C = pairwise_cost(target, bank, cost)
    pairs = hungarian_assignment(C, mode=mode, seed=seed)
    loss = paired_cost(target[pairs.rows], bank[pairs.cols], cost).mean()
    n = target.shape[0]
    info = dict(n_pairs=pairs.n_pairs, n_rows=n, share_rows_in_pairs=pairs.n_pairs / n)
    if return_pairs:
        info["pairs"] = pairs
    return loss, info


# ----------------------------------------------------------------------------------------------------------
# parametric (Gaussian) losses
# ----------------------------------------------------------------------------------------------------------


class SourceStats(NamedTuple):
    """Mean (D,) and unbiased covariance (D, D) of the bank, and its size."""

    mean: torch.Tensor
    cov: torch.Tensor
    n: int


def _mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance ``(x - mu)^T (x - mu) / (n - 1)`` of the rows of ``x`` (n, D)."""
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def source_stats(bank: torch.Tensor) -> SourceStats:
    """Source statistics from the memory bank only (computed once, detached, float32 or the bank's dtype)."""
    bank = bank.detach()
    if bank.dim() != 2 or bank.shape[0] == 0:
        raise ValueError(f"the memory bank must be a non-empty (M, D) tensor, got shape {tuple(bank.shape)}")
    mu, cov = _mean_cov(bank)
    return SourceStats(mu, cov, int(bank.shape[0]))


def _stats(target, bank, stats):
    if stats is None:
        _prepare(target, bank)
        stats = source_stats(bank)
    if target.dim() != 2 or target.shape[1] != stats.mean.shape[0]:
        raise ValueError(
            f"target features must be (N, {stats.mean.shape[0]}), got shape {tuple(target.shape)}"
        )
    return stats.mean.to(target), stats.cov.to(target)


def moment_matching_loss(
    target: torch.Tensor,
    bank: torch.Tensor | None,
    stats: SourceStats | None = None,
    coral_scaling: bool = False,
    mean_reduction: str = "sum",
):
    """TTT++ moment matching, RoDA Eq. 3: ``||mu_s - mu_t||_2^2 + ||Sigma_s - Sigma_t||_F^2``.

    Source ``(mu_s, Sigma_s)`` from the bank (or precomputed ``stats``), target ``(mu_t, Sigma_t)`` from the
    minibatch (unbiased covariance, with gradient). ``coral_scaling=True`` divides the covariance term by
    ``4 d^2`` and ``mean_reduction="mean"`` averages the squared mean difference over dimensions instead of
    summing, which together are the normalisation of the TTT++ code (``coral`` and ``linear_mmd``); the
    default is Eq. 3 as written.
    """
    if mean_reduction not in ("sum", "mean"):
        raise ValueError(f"unknown mean_reduction {mean_reduction!r}; choose 'sum' or 'mean'")
    mu_s, cov_s = _stats(target, bank, stats)
    mu_t, cov_t = _mean_cov(target)
    d = target.shape[1]
    dm = (mu_s - mu_t).pow(2)
    mean_term = dm.sum() if mean_reduction == "sum" else dm.mean()
    cov_term = (cov_s - cov_t).pow(2).sum()
    if coral_scaling:
        cov_term = cov_term / (4.0 * d * d)
    loss = mean_term + cov_term
    return loss, dict(mean_term=float(mean_term.detach()), cov_term=float(cov_term.detach()))


def gaussian_kl_loss(
    target: torch.Tensor,
    bank: torch.Tensor | None,
    stats: SourceStats | None = None,
    ridge: float = 1e-2,
    diagonal: bool = False,
    direction: str = "symmetric",
):
    """TTAC-style KL divergence between Gaussians fitted to the source bank and the target minibatch.

    ``N_s = N(mu_s, Sigma_s + lam I)``, ``N_t = N(mu_t, Sigma_t + lam I)``, ``lam = ridge * mean(diag Sigma_s)``
    (a ridge relative to the source feature scale, detached; TTAC adds ``max(Sigma_s) / 30`` to the target
    covariance for the same purpose). ``direction="symmetric"`` (TTAC) gives ``KL(s||t) + KL(t||s)``, whose
    log-determinants cancel::

        KL(s||t) + KL(t||s) = 1/2 [tr(St^-1 Ss) + tr(Ss^-1 St) + dmu^T (Ss^-1 + St^-1) dmu] - d

    ``"forward"`` is ``KL(s||t)``, ``"reverse"`` is ``KL(t||s)``, with
    ``KL(p||q) = 1/2 [tr(Sq^-1 Sp) + dmu^T Sq^-1 dmu - d + log det Sq - log det Sp]``. ``diagonal=True`` keeps
    only the variances (cheap for large D). Full covariances go through Cholesky factors (float64 inside).
    """
    if direction not in ("symmetric", "forward", "reverse"):
        raise ValueError(f"unknown direction {direction!r}; choose 'symmetric', 'forward' or 'reverse'")
    mu_s, cov_s = _stats(target, bank, stats)
    mu_t, cov_t = _mean_cov(target)
    d = target.shape[1]
    lam = ridge * cov_s.diagonal().mean().detach().clamp_min(1e-12)
    dmu = mu_s - mu_t
    if diagonal:
        vs = cov_s.diagonal() + lam
        vt = cov_t.diagonal() + lam
        kl_st = 0.5 * ((vs / vt).sum() + (dmu.pow(2) / vt).sum() - d + vt.log().sum() - vs.log().sum())
        kl_ts = 0.5 * ((vt / vs).sum() + (dmu.pow(2) / vs).sum() - d + vs.log().sum() - vt.log().sum())
    else:
        dt = target.dtype
        eye = torch.eye(d, dtype=torch.float64, device=target.device)
        Ls = torch.linalg.cholesky(cov_s.double() + lam.double() * eye)
        Lt = torch.linalg.cholesky(cov_t.double() + lam.double() * eye)
        dmu64 = dmu.double().unsqueeze(1)

        def kl(Lp, Lq):  # KL(N(., Lp Lp^T) || N(., Lq Lq^T)) with the shared dmu
            A = torch.linalg.solve_triangular(Lq, Lp, upper=False)  # Lq^-1 Lp: tr(Sq^-1 Sp) = ||A||_F^2
            m = torch.linalg.solve_triangular(Lq, dmu64, upper=False)
            logdet = 2 * (Lq.diagonal().log().sum() - Lp.diagonal().log().sum())
            return 0.5 * (A.pow(2).sum() + m.pow(2).sum() - d + logdet)

        kl_st = kl(Ls, Lt).to(dt)
        kl_ts = kl(Lt, Ls).to(dt)
    loss = {"symmetric": kl_st + kl_ts, "forward": kl_st, "reverse": kl_ts}[direction]
    return loss, dict(kl_source_target=float(kl_st.detach()), kl_target_source=float(kl_ts.detach()), ridge=float(lam))


#: name -> loss function, the methods of RoDA Tab. 1/4 ("ttt++" = moment matching, "ttac" = Gaussian KL)
ALIGNMENT_LOSSES = {
    "roda": roda_loss,
    "continuous_ot": continuous_ot_loss,
    "hungarian": hungarian_loss,
    "ttt++": moment_matching_loss,
    "ttac": gaussian_kl_loss,
}
