"""Entropic optimal transport for RoDA (Sec. 3.2-3.3): costs, log-domain Sinkhorn, Eq. 6 discretization.

Notation (RoDA Eq. 4-6): ``N = N_tp`` target patches (rows, index ``i``), ``M = N_M`` memory-bank entries
(columns, index ``j``), cost ``C in R^{N x M}``, ``C_ij = ||z_i - m_j||``. Note that Algorithm 1 writes the
cost the other way round (``|D_s| x |B_t|``); every function here uses the Eq. 4 orientation, target rows
and bank columns.

Entropic OT (Eq. 5), with uniform marginals by default (Eq. 4)::

    gamma* = argmin_{gamma >= 0}  sum_ij gamma_ij C_ij + eps sum_ij gamma_ij log gamma_ij
             s.t.  sum_j gamma_ij = a_i = 1/N,   sum_i gamma_ij = b_j = 1/M.

Its solution has the form ``gamma_ij = exp((f_i + g_j - C_ij) / eps)`` with dual potentials ``f, g``, which
Sinkhorn's alternating projections find::

    g_j <- eps log b_j - eps log sum_i exp((f_i - C_ij) / eps)      (columns exact)
    f_i <- eps log a_i - eps log sum_j exp((g_j - C_ij) / eps)      (rows exact)

This is the iteration of POT's ``ot.bregman.sinkhorn_log`` (same update order, same stopping quantity
``||gamma^T 1 - b||_2`` checked every 10 iterations, same fixed point). One difference: the cost is shifted by
its row minima first (``C_ij - min_j C_ij``, which leaves the plan unchanged) and the iteration starts from
``f = g = 0`` in the shifted cost, i.e. ``f_i = min_j C_ij`` in the original one (POT: ``f = 0``); this keeps
the potentials small, which is what limits float32 accuracy, and changes iteration counts only marginally.

:func:`sinkhorn_log` runs the iteration either with ``logsumexp`` (``method="log"``) or, by default, in the
*absorption-stabilised* scaling form
(``method="absorb"``): between two absorptions the kernel ``K = exp((f + g - C) / eps)`` is fixed and the
iteration is two matrix-vector products ``v = b / K^T u``, ``u = a / K v``; when ``u`` or ``v`` leave
``[1/tau, tau]`` they are absorbed into the potentials (``f += eps log u``, ``g += eps log v``) and ``K`` is
recomputed. The plain kernel ``exp(-C/eps)`` underflows to all-zero rows once ``C/eps > 87`` (float32);
here the first iteration is a ``logsumexp`` step and every kernel is built from potentials that already
satisfy one marginal, and after any Sinkhorn half-step every row and column of the plan holds at least
``min(a) * min(b)`` mass (``1/(N M)`` for uniform marginals), so no row or column sum can underflow. A
non-finite scaling (only possible with extreme non-uniform marginals) is nevertheless detected and that step is
redone with ``logsumexp``. The iterates are the same as the log iteration; only the arithmetic is cheaper (two
matvecs instead of ``exp`` over the whole matrix), about 10x per iteration on CPU.

Precision: in float32 the plan entries carry a relative error of about ``1e-7 * max |f/eps|``, so keep the
cost normalised (:func:`normalize_cost`, ``eps`` relative to its scale) or pass ``dtype=torch.float64``.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "SinkhornWarning",
    "Pairs",
    "pairwise_cost",
    "paired_cost",
    "normalize_cost",
    "sinkhorn_log",
    "discretize",
    "pairs_to_mask",
    "assignment_stats",
    "hungarian_assignment",
]

COST_KINDS = ("l2", "sqeuclidean", "cosine")
NORM_MODES = ("mean", "median", "max", "none")
RULES = ("or", "and", "row", "col")


class SinkhornWarning(UserWarning):
    """Sinkhorn stopped at ``max_iter`` before the marginal error reached ``tol`` (the plan is still usable)."""


# ----------------------------------------------------------------------------------------------------------
# costs
# ----------------------------------------------------------------------------------------------------------


def _sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||x_i||^2 - 2 x_i.y_j + ||y_j||^2`` by one matmul, clamped at 0 (rounding can make it negative)."""
    xx = (x * x).sum(-1, keepdim=True)  # (..., N, 1)
    yy = (y * y).sum(-1).unsqueeze(-2)  # (..., 1, M)
    if x.dim() == 2 and y.dim() == 2:
        d2 = torch.addmm(xx + yy, x, y.T, alpha=-2.0)
    else:
        d2 = (xx + yy) - 2.0 * (x @ y.transpose(-1, -2))
    return d2.clamp_min(0.0)


def _safe_sqrt(d2: torch.Tensor, tiny: float = 1e-12) -> torch.Tensor:
    """``sqrt`` whose gradient at 0 is 0 (a subgradient of the norm) instead of ``inf * 0 = NaN``; NaN stays NaN."""
    positive = d2 > tiny
    return torch.where(positive, torch.where(positive, d2, torch.ones_like(d2)).sqrt(), d2 * 0.0)


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, kind: str = "l2", chunk: int | None = None) -> torch.Tensor:
    """Cost matrix ``C_ij = c(x_i, y_j)`` between rows of ``x`` (..., N, D) and ``y`` (..., M, D).

    ``kind``:

    - ``"l2"``: ``||x_i - y_j||_2`` (RoDA Sec. 3.2, ``C_ij = ||z_i - m_j||``),
    - ``"sqeuclidean"``: ``||x_i - y_j||_2^2``,
    - ``"cosine"``: ``1 - <x_i, y_j> / (||x_i|| ||y_j||)``.

    Computed by a matmul (``||x||^2 - 2 x.y + ||y||^2``, clamped at 0), so it costs one GEMM and no
    (N, M, D) intermediate; the price is float rounding for near-identical points (about ``1e-7 ||x||^2`` in the
    squared distance in float32). Differentiable in ``x`` and ``y``; the ``l2`` square root has gradient 0 at
    coincident points instead of NaN. ``chunk`` computes ``chunk`` rows of ``x`` at a time (peak-memory cap for
    the temporaries; the result is still the full matrix).
    """
    if kind not in COST_KINDS:
        raise ValueError(f"unknown cost kind {kind!r}; choose one of {COST_KINDS}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"feature dimensions differ: x has D={x.shape[-1]}, y has D={y.shape[-1]}")
    if chunk is not None and chunk < x.shape[-2]:
        parts = [pairwise_cost(x[..., s : s + chunk, :], y, kind) for s in range(0, x.shape[-2], chunk)]
        return torch.cat(parts, dim=-2)
    if kind == "cosine":
        xn = torch.nn.functional.normalize(x, dim=-1, eps=1e-12)
        yn = torch.nn.functional.normalize(y, dim=-1, eps=1e-12)
        return 1.0 - xn @ yn.transpose(-1, -2)
    d2 = _sq_dist(x, y)
    return d2 if kind == "sqeuclidean" else _safe_sqrt(d2)


def paired_cost(x: torch.Tensor, y: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Row-wise cost ``c(x_k, y_k)`` of matched rows (K, D) x (K, D) -> (K,), same kinds as
    :func:`pairwise_cost`. Computed from the differences (exact, no cancellation), with gradient; used for
    losses over a discrete assignment, ``sum_k c(z_{rows_k}, m_{cols_k})``, which then never builds an (N, M)
    autograd graph."""
    if kind not in COST_KINDS:
        raise ValueError(f"unknown cost kind {kind!r}; choose one of {COST_KINDS}")
    if kind == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
    d2 = (x - y).pow(2).sum(-1)
    return d2 if kind == "sqeuclidean" else _safe_sqrt(d2, tiny=0.0)


def normalize_cost(C: torch.Tensor, mode: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """``(C / s, s)`` with a detached scale ``s`` so that ``eps`` is relative to the cost scale.

    ``s`` is the mean, median or max of the cost (over the last two dims, so each problem of a batch has its
    own scale, shape ``(..., 1, 1)``), or 1 for ``"none"``. An all-zero cost keeps ``s = 1``. The returned ``C/s``
    keeps the gradient of ``C`` (``s`` is a constant); the plan of ``(C/s, eps)`` equals the plan of
    ``(C, eps * s)``.
    """
    if mode not in NORM_MODES:
        raise ValueError(f"unknown cost normalisation {mode!r}; choose one of {NORM_MODES}")
    Cd = C.detach()
    if mode == "none" or Cd.numel() == 0:
        s = torch.ones(Cd.shape[:-2] + (1, 1), dtype=Cd.dtype, device=Cd.device)
    else:
        flat = Cd.reshape(Cd.shape[:-2] + (-1,))
        if mode == "mean":
            s = flat.mean(-1)
        elif mode == "median":
            s = flat.median(-1).values
        else:
            s = flat.amax(-1)
        s = torch.where(s > 0, s, torch.ones_like(s))[..., None, None]
    return C / s, s


# ----------------------------------------------------------------------------------------------------------
# Sinkhorn
# ----------------------------------------------------------------------------------------------------------


def _check_weights(w, n: int, batch: torch.Size, name: str, dtype, device) -> torch.Tensor:
    if w is None:
        return torch.full(batch + (n,), 1.0 / n, dtype=dtype, device=device)
    w = torch.as_tensor(w).to(device=device, dtype=dtype)
    if w.numel() == 0:  # POT's convention: an empty histogram means uniform
        return torch.full(batch + (n,), 1.0 / n, dtype=dtype, device=device)
    if w.shape[-1] != n:
        raise ValueError(f"marginal {name} has {w.shape[-1]} entries but the cost has {n} along that side")
    if not torch.isfinite(w).all() or (w <= 0).any():
        raise ValueError(
            f"marginal {name} must be finite and strictly positive; drop zero-weight rows/columns from the cost"
        )
    return w.expand(batch + (n,))


def _lse_rows(Mr, vec, work):
    """``log sum_i exp(Mr_ij + vec_i)`` (reduce over rows), using ``work`` as scratch."""
    torch.add(Mr, vec.unsqueeze(-1), out=work)
    m = work.amax(-2, keepdim=True)
    work.sub_(m).exp_()
    return work.sum(-2).log_().add_(m.squeeze(-2))


def _lse_cols(Mr, vec, work):
    """``log sum_j exp(Mr_ij + vec_j)`` (reduce over columns), using ``work`` as scratch."""
    torch.add(Mr, vec.unsqueeze(-2), out=work)
    m = work.amax(-1, keepdim=True)
    work.sub_(m).exp_()
    return work.sum(-1).log_().add_(m.squeeze(-1))


def _kernel(Mr, alpha, beta, work):
    """``K = exp(Mr + alpha_i + beta_j)`` written into ``work``."""
    torch.add(Mr, alpha.unsqueeze(-1), out=work)
    work.add_(beta.unsqueeze(-2)).exp_()
    return work


def _err(colsum, b):
    """POT's stopping quantity ``||gamma^T 1 - b||_2`` and the total-variation distance of the column
    marginal to ``b`` (the fraction of mass on the wrong columns), each the max over a batch."""
    d = colsum - b
    l2 = torch.linalg.vector_norm(d, dim=-1)
    tv = 0.5 * d.abs().sum(-1) / b.sum(-1)
    return l2.max().item(), tv.max().item()


def sinkhorn_log(
    C,
    eps: float,
    a=None,
    b=None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    check_every: int = 10,
    return_log: bool = False,
    init: tuple | None = None,
    method: str = "absorb",
    dtype: torch.dtype | None = None,
    tau: float = 1e3,
    degenerate_tv: float = 0.5,
    warn: bool = True,
):
    """Entropic OT plan of RoDA Eq. 5 by log-domain Sinkhorn (see the module docstring for the iteration).

    Args:
        C: cost (..., N, M) tensor or array; leading dims are independent problems solved together.
        eps: entropic regularisation, in the units of ``C`` (normalise ``C`` first, :func:`normalize_cost`).
        a, b: row / column marginals, (..., N) / (..., M); ``None`` means uniform ``1/N`` and ``1/M`` (Eq. 4).
        tol: stop once the column-marginal error ``||gamma^T 1 - b||_2`` (POT's ``stopThr`` quantity; the
            row marginal is exact after every iteration) is below ``tol`` for every problem of the batch.
        max_iter: maximum number of Sinkhorn iterations (one column and one row update each).
        check_every: the marginal error is evaluated every ``check_every`` iterations (it is free in the
            ``absorb`` method, one extra pass in ``log``).
        return_log: return ``log gamma`` instead of ``gamma`` (no underflow; same argmaxes).
        init: warm start ``(f, g)``, the potentials ``info["f"], info["g"]`` of an earlier call (cost units).
            ``f`` (target side) is used when given (the first update recomputes ``g``); ``(None, g)`` starts
            from the bank-side potentials only, which is what carries over to a *new* minibatch against the
            same bank.
        method: ``"absorb"`` (scaling form with absorption into log potentials, fast; default) or ``"log"``
            (``logsumexp`` every half-step, like POT). Same iterates either way.
        dtype: computation dtype; default float32, or float64 when ``C`` is float64.
        tau: absorption threshold of the ``absorb`` method (``u``/``v`` outside ``[1/tau, tau]``).
        degenerate_tv: a plan that did not converge and still has more than this fraction of its mass on the
            wrong columns (total variation ``0.5 sum_j |gamma^T 1 - b|_j / sum b``) raises instead of warning.
        warn: emit a :class:`SinkhornWarning` when ``max_iter`` is reached before ``tol``.

    Returns:
        ``(plan, info)``: plan (..., N, M) (or its log) with ``plan = exp((f_i + g_j - C_ij) / eps)``, and
        ``info = dict(n_iter, marginal_error, marginal_tv, converged, f, g, n_absorb, n_log_steps, n_fallback,
        method)``.

    Raises:
        ValueError: ``eps <= 0``, NaN/inf in the cost, empty cost, bad marginals, or a numerically degenerate
        plan (each message names the likely fix).

    Runs under ``torch.no_grad``: RoDA never differentiates the plan (the loss differentiates ``C`` only).
    """
    with torch.no_grad():
        out, info = _sinkhorn_log(C, eps, a, b, tol, max_iter, check_every, return_log, init, method, dtype, tau,
                                  degenerate_tv)
    if warn and not info["converged"]:
        warnings.warn(
            f"Sinkhorn did not converge in {info['n_iter']} iterations (marginal error {info['marginal_error']:.3g} "
            f"> tol {tol:g}); increase max_iter or eps (relative to cost scale)",
            SinkhornWarning,
            stacklevel=2,
        )
    return out, info


def _sinkhorn_log(C, eps, a, b, tol, max_iter, check_every, return_log, init, method, dtype, tau, degenerate_tv):
    if method not in ("absorb", "log"):
        raise ValueError(f"unknown method {method!r}; choose 'absorb' or 'log'")
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a positive number, got {eps!r}") from None
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite positive number, got {eps!r} (it is relative to the cost scale)")
    if check_every < 1 or max_iter < 1:
        raise ValueError("max_iter and check_every must be >= 1")
    C = torch.as_tensor(C)
    if C.dim() < 2:
        raise ValueError(f"the cost must have shape (..., N, M), got {tuple(C.shape)}")
    N, M = C.shape[-2], C.shape[-1]
    if C.numel() == 0:
        raise ValueError(
            f"empty cost matrix of shape {tuple(C.shape)} (N_tp={N} target patches, N_M={M} bank entries): "
            "is the target split, the minibatch or the memory bank empty?"
        )
    if not torch.isfinite(C).all():
        if torch.isnan(C).any():
            raise ValueError(
                "NaN in cost matrix: check the features for NaN (diverged adaptation? lower the learning rate)"
            )
        raise ValueError(
            "inf in cost matrix: check the features for inf/overflow (diverged adaptation? lower the learning rate)"
        )
    if dtype is None:
        dtype = torch.float64 if C.dtype == torch.float64 else torch.float32
    # the plan is invariant to C_ij -> C_ij - r_i; subtracting the row minimum (in the input precision) keeps
    # -C/eps and the potentials small, which is what limits float32 accuracy (exp of a sum of large numbers)
    C = C.detach()
    shift = C.amin(-1, keepdim=True)
    Mr = (C - shift).to(dtype)  # a fresh tensor: scaled in place below into -C/eps
    shift = shift.squeeze(-1).to(dtype)
    device = C.device
    batch = C.shape[:-2]
    a = _check_weights(a, N, batch, "a", dtype, device)
    b = _check_weights(b, M, batch, "b", dtype, device)
    if (a.sum(-1) - b.sum(-1)).abs().max() > 1e-5 * b.sum(-1).abs().max():
        raise ValueError("marginals a and b must have the same total mass (this is balanced OT)")
    loga, logb = a.log(), b.log()

    spread = Mr.max().item()
    Mr.mul_(-1.0 / eps)  # the only copy of -C/eps; every update works on it
    if not torch.isfinite(Mr).all():
        raise ValueError(
            f"C/eps overflows {dtype}: eps={eps:g} is far too small for cost spreads up to {spread:.3g}; "
            "increase eps (relative to cost scale) or normalise the cost (normalize_cost)"
        )
    work = torch.empty_like(Mr)
    f0, g0 = init if init is not None else (None, None)
    if f0 is not None:
        alpha = (torch.as_tensor(f0).to(device=device, dtype=dtype).expand(batch + (N,)) - shift) / eps
    elif g0 is not None:  # bank-side potentials only (a new minibatch against the same bank): row update first
        beta0 = torch.as_tensor(g0).to(device=device, dtype=dtype).expand(batch + (M,)) / eps
        alpha = loga - _lse_cols(Mr, beta0, work)
    else:
        alpha = torch.zeros(batch + (N,), dtype=dtype, device=device)
    beta = torch.zeros(batch + (M,), dtype=dtype, device=device)
    del C

    def log_step(alpha):
        lse = _lse_rows(Mr, alpha, work)  # log column sums of exp(Mr + alpha), before the column update
        beta = logb - lse
        alpha = loga - _lse_cols(Mr, beta, work)
        return alpha, beta, lse

    log_tau = math.log(tau)
    n_absorb = n_log = n_fallback = 0
    err, tv, converged = float("inf"), float("inf"), False
    n = 0
    # iteration 1 is always a log step: it makes every row of the first kernel sum to a_i (no all-zero row)
    alpha, beta, _ = log_step(alpha)
    n, n_log = 1, 1
    use_log = method == "log"
    K = u = v = None
    log_until = 0  # after a detected underflow, stay in log steps until this iteration
    while True:
        check = n % check_every == 0 or n == max_iter
        if use_log or n < log_until:
            if K is not None:  # leaving the scaling form: absorb
                alpha, beta, K = alpha + u.log(), beta + v.log(), None
            if check:
                lse = _lse_rows(Mr, alpha, work)
                err, tv = _err((beta + lse).exp(), b)
                if err < tol:
                    converged = True
                    break
                if n >= max_iter:
                    break
                beta = logb - lse
                alpha = loga - _lse_cols(Mr, beta, work)
            else:
                alpha, beta, _ = log_step(alpha)
            n += 1
            n_log += 1
            continue
        if K is None:
            K = _kernel(Mr, alpha, beta, work)
            u = torch.ones_like(alpha)
            v = torch.ones_like(beta)
            n_absorb += 1
        Ktu = (u.unsqueeze(-2) @ K).squeeze(-2)  # column sums of diag(u) K
        if check:
            err, tv = _err(v * Ktu, b)
            if err < tol:
                converged = True
                break
            if n >= max_iter:
                break
        v_new = b / Ktu
        u_new = a / (K @ v_new.unsqueeze(-1)).squeeze(-1)
        # one host sync per iteration for both tests: (any bad scaling, any scaling outside [1/tau, tau])
        log_u, log_v = u_new.log(), v_new.log()
        bad, big = torch.stack([
            ~(torch.isfinite(log_u).all() & torch.isfinite(log_v).all()),
            torch.maximum(log_u.abs().max(), log_v.abs().max()) > log_tau,
        ]).tolist()
        if bad:
            # a column/row sum underflowed (tiny eps, far from convergence): absorb the last good scalings and
            # redo this step with logsumexp, staying in log steps until the next check
            alpha, beta, K = alpha + u.log(), beta + v.log(), None
            log_until = (n // check_every + 1) * check_every
            n_fallback += 1
            continue
        u, v = u_new, v_new
        n += 1
        if big:
            alpha, beta, K = alpha + log_u, beta + log_v, None
    if K is not None:
        alpha, beta = alpha + u.log(), beta + v.log()
        K = None

    if not (torch.isfinite(alpha).all() and torch.isfinite(beta).all()) or not math.isfinite(err):
        raise ValueError(
            f"Sinkhorn plan is numerically degenerate (non-finite potentials) at eps={eps:g}: "
            "increase eps (relative to cost scale) or max_iter"
        )
    if not converged:
        if tv > degenerate_tv:
            raise ValueError(
                f"Sinkhorn plan is numerically degenerate: after {n} iterations {100 * tv:.0f}% of the "
                f"column mass is misplaced (marginal error {err:.3g} > tol {tol:g}) at eps={eps:g}: "
                "increase eps (relative to cost scale) or max_iter"
            )
    out = torch.add(Mr, alpha.unsqueeze(-1), out=work).add_(beta.unsqueeze(-2))
    del Mr
    if not return_log:
        out.exp_()
    info = dict(
        n_iter=n,
        marginal_error=err,
        marginal_tv=tv,
        converged=converged,
        f=alpha * eps + shift,
        g=beta * eps,
        n_absorb=n_absorb,
        n_log_steps=n_log,
        n_fallback=n_fallback,
        method=method,
    )
    return out, info


# ----------------------------------------------------------------------------------------------------------
# Eq. 6 discretization
# ----------------------------------------------------------------------------------------------------------


class Pairs(NamedTuple):
    """A discrete assignment ``pi`` stored as index pairs (``pi_ij = 1`` for ``(rows[k], cols[k])``).

    ``row_argmax`` (N,) and ``col_argmax`` (M,) are the plan's argmaxes the pairs were built from
    (``None`` for Hungarian pairs). Each pair appears once; ``n_pairs`` counts them, ``dense()`` gives the
    (N, M) mask.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    shape: tuple
    rule: str
    row_argmax: torch.Tensor | None = None
    col_argmax: torch.Tensor | None = None

    def dense(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        return pairs_to_mask(self, dtype)

    @property
    def n_pairs(self) -> int:
        return int(self.rows.numel())


def pairs_to_mask(pairs: Pairs, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Dense (N, M) mask of a :class:`Pairs` (``dtype`` bool, or float for ``sum(pi * C)``)."""
    mask = torch.zeros(tuple(pairs.shape), dtype=dtype, device=pairs.rows.device)
    mask[pairs.rows, pairs.cols] = 1
    return mask


def discretize(plan: torch.Tensor, rule: str = "or") -> Pairs:
    """Discrete assignment ``pi*`` from a transport plan ``gamma*`` (N, M), RoDA Eq. 6.

    Eq. 6 (``rule="or"``)::

        pi_ij = 1  if  j = argmax_j' gamma_ij'   or   i = argmax_i' gamma_i'j,   else 0.

    With ``r(i) = argmax_j gamma_ij`` (each target patch's strongest bank entry) and ``c(j) = argmax_i
    gamma_ij`` (each bank entry's strongest target patch) the rules are

    - ``"row"``: ``{(i, r(i))}`` - exactly N pairs, one per target patch;
    - ``"col"``: ``{(c(j), j)}`` - exactly M pairs, one per bank entry;
    - ``"or"`` (Eq. 6 as written): the union, N to N + M pairs;
    - ``"and"``: mutual argmaxes ``{(i, r(i)) : c(r(i)) = i}`` (not in the paper; at most min(N, M) pairs).

    What Eq. 6 does and does not remove: under ``"or"`` every target row keeps its row argmax, so *every*
    target patch, anomalous ones included, is pulled towards a bank entry; no target patch is dropped. What
    the discretization removes is the diffuse part of gamma (all the entropic mass off the argmaxes), and
    the pairs it adds beyond one per row are the column-argmax pairs, i.e. the target patches that some bank
    entry "wants most" receive extra weight in the mean. The paper's claim that discretization "eliminates
    weak assignments that often appear on anomalous patches" holds for the column-argmax set (an anomalous
    patch far from the bank is rarely any bank entry's argmax, see :func:`assignment_stats`) and for the
    ``"and"``/``"col"`` rules, not for the per-row pairs of ``"or"``. ``plan`` may equally be ``log gamma``
    (argmaxes are unchanged). Ties resolve to the first index.
    """
    if rule not in RULES:
        raise ValueError(f"unknown discretization rule {rule!r}; choose one of {RULES}")
    if plan.dim() != 2:
        raise ValueError(f"discretize takes one (N, M) plan, got shape {tuple(plan.shape)}; loop over a batch")
    N, M = plan.shape
    if N == 0 or M == 0:
        raise ValueError(f"empty plan of shape {(N, M)}")
    r = plan.argmax(1)  # (N,)  bank index of each row's max
    c = plan.argmax(0)  # (M,)  target index of each column's max
    rows_r = torch.arange(N, device=plan.device)
    cols_c = torch.arange(M, device=plan.device)
    mutual = r[c] == cols_c  # column j's argmax row i=c(j) has r(i) = j, i.e. (c(j), j) is also a row pair
    if rule == "row":
        rows, cols = rows_r, r
    elif rule == "col":
        rows, cols = c, cols_c
    elif rule == "and":
        rows, cols = c[mutual], cols_c[mutual]
    else:  # "or": the row pairs plus the column pairs that are not already row pairs
        rows = torch.cat([rows_r, c[~mutual]])
        cols = torch.cat([r, cols_c[~mutual]])
    return Pairs(rows, cols, (N, M), rule, r, c)


def assignment_stats(pi, anomalous_rows=None, plan: torch.Tensor | None = None) -> dict:
    """Counts of a discrete assignment, for the loss logs and RoDA Fig. 5a.

    Two notions of a target patch (row) being "assigned" are reported, because under Eq. 6's ``"or"`` rule
    every row is in some pair (its row argmax always exists), which would make Fig. 5a's count trivially 100%:

    - ``rows_in_pairs``: rows appearing in at least one pair of ``pi`` (for ``"or"``/``"row"``: all rows);
    - ``rows_col_argmax``: rows that are the argmax of at least one bank column (``i = c(j)`` for some j), i.e.
      that receive a column-argmax pair. This is our reading of "assigned" in Fig. 5a (the patches the
      discretization keeps beyond the mandatory per-row pair). Needs ``pi`` from :func:`discretize`, or a dense
      mask together with ``plan``.

    Args:
        pi: :class:`Pairs` or a dense (N, M) mask.
        anomalous_rows: optional boolean (N,) vector marking anomalous target patches.
        plan: the plan, only needed with a dense ``pi`` to get the column argmaxes.

    Returns: dict with ``n_rows, n_pairs, n_rows_in_pairs, share_rows_in_pairs, n_rows_col_argmax,
    share_rows_col_argmax`` and, with ``anomalous_rows``, ``n_anomalous, n_anomalous_in_pairs,
    n_anomalous_col_argmax, share_anomalous_col_argmax`` (``None`` where not computable).
    """
    if isinstance(pi, Pairs):
        N = pi.shape[0]
        rows = pi.rows
        c = pi.col_argmax
        n_pairs = int(pi.rows.numel())
        device = rows.device
    else:
        mask = torch.as_tensor(pi).bool()
        N = mask.shape[0]
        rows = mask.any(1).nonzero().squeeze(1)
        n_pairs = int(mask.sum())
        c = plan.argmax(0) if plan is not None else None
        device = mask.device
    in_pairs = torch.zeros(N, dtype=torch.bool, device=device)
    in_pairs[rows] = True
    col_arg = None
    if c is not None:
        col_arg = torch.zeros(N, dtype=torch.bool, device=device)
        col_arg[c] = True
    out = dict(
        n_rows=N,
        n_pairs=n_pairs,
        n_rows_in_pairs=int(in_pairs.sum()),
        share_rows_in_pairs=float(in_pairs.float().mean()) if N else 0.0,
        n_rows_col_argmax=None if col_arg is None else int(col_arg.sum()),
        share_rows_col_argmax=None if col_arg is None else float(col_arg.float().mean()),
    )
    if anomalous_rows is not None:
        an = torch.as_tensor(anomalous_rows, device=device).bool().reshape(-1)
        if an.numel() != N:
            raise ValueError(f"anomalous_rows has {an.numel()} entries, the assignment has {N} target rows")
        n_an = int(an.sum())
        out["n_anomalous"] = n_an
        out["n_anomalous_in_pairs"] = int((in_pairs & an).sum())
        out["n_anomalous_col_argmax"] = None if col_arg is None else int((col_arg & an).sum())
        out["share_anomalous_col_argmax"] = (
            None if col_arg is None or n_an == 0 else out["n_anomalous_col_argmax"] / n_an
        )
    return out


def hungarian_assignment(C, mode: str = "subsample", seed: int = 0) -> Pairs:
    """One-to-one assignment minimising ``sum C_ij`` (``scipy.optimize.linear_sum_assignment``), RoDA Tab. 4.

    With ``N <= M`` every target row gets a distinct bank entry. With more target patches than bank entries
    (the usual ``N_tp = 7840 > N_M``) a one-to-one matching cannot cover every row, so:

    - ``"subsample"``: match a random subset of ``M`` target rows (``seed``), each to a distinct bank entry;
    - ``"tile"``: repeat the bank ``k = ceil(N / M)`` times (each bank entry usable ``k`` times) so every target
      row is matched; cubic in ``k M``, so slow for thousands of rows.

    Returns :class:`Pairs` in the original indices (``rule="hungarian"``). Not differentiable (CPU, float64).
    """
    from scipy.optimize import linear_sum_assignment

    if mode not in ("subsample", "tile"):
        raise ValueError(f"unknown Hungarian mode {mode!r}; choose 'subsample' or 'tile'")
    Ct = torch.as_tensor(C)
    if Ct.dim() != 2 or Ct.numel() == 0:
        raise ValueError(f"hungarian_assignment takes a non-empty (N, M) cost, got shape {tuple(Ct.shape)}")
    if not torch.isfinite(Ct).all():
        raise ValueError("NaN/inf in cost matrix: check the features (diverged adaptation? lower the learning rate)")
    device = Ct.device
    Cn = Ct.detach().to("cpu", torch.float64).numpy()
    N, M = Cn.shape
    sub = np.arange(N)
    if N > M and mode == "subsample":
        sub = np.sort(np.random.default_rng(seed).choice(N, size=M, replace=False))
        Cn = Cn[sub]
    elif N > M:
        k = math.ceil(N / M)
        Cn = np.tile(Cn, (1, k))
    r, c = linear_sum_assignment(Cn)
    rows = torch.as_tensor(sub[r], dtype=torch.long, device=device)
    cols = torch.as_tensor(c % M, dtype=torch.long, device=device)
    return Pairs(rows, cols, (N, M), f"hungarian-{mode}")
