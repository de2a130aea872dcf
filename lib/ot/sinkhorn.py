"""Entropic optimal transport solvers for RoDA Eq. 5: one entry point, :func:`sinkhorn`, several methods.

Notation (RoDA Eq. 4-6): ``N`` target patches (rows, index ``i``), ``M`` memory-bank entries (columns,
index ``j``), cost ``C in R^{N x M}``. Entropic OT (Eq. 5)::

    gamma* = argmin_{gamma >= 0}  sum_ij gamma_ij C_ij + eps sum_ij gamma_ij log gamma_ij
             s.t.  sum_j gamma_ij = a_i,   sum_i gamma_ij = b_j          (uniform 1/N, 1/M by default)

Its solution is ``gamma_ij = exp((f_i + g_j - C_ij) / eps)`` with dual potentials ``f, g`` that Sinkhorn's
alternating projections find::

    g_j <- eps log b_j - eps log sum_i exp((f_i - C_ij) / eps)            (columns exact)
    f_i <- phi [eps log a_i - eps log sum_j exp((g_j - C_ij) / eps)]      (rows; phi = 1: exact)

``method`` picks how this runs (POT's ``ot.sinkhorn(method=...)`` pattern):

- ``"log"`` (:func:`sinkhorn_log_domain`): ``logsumexp`` every half-step, the iteration of POT's
  ``ot.bregman.sinkhorn_log`` (same update order, same stopping quantity ``||gamma^T 1 - b||_2`` every
  ``check_every`` iterations, same fixed point);
- ``"absorb"`` (:func:`sinkhorn_absorb`, default): the same iterates in scaling form with absorption: between
  two absorptions the kernel ``K = exp((f + g - C)/eps)`` is fixed and an iteration is two matrix-vector
  products ``v = b / K^T u``, ``u = a / K v``; scalings outside ``[1/tau, tau]`` are absorbed into the
  potentials and ``K`` is rebuilt. About 10x cheaper per iteration than ``"log"`` on CPU;
- ``"unbalanced"`` (:func:`sinkhorn_unbalanced`): both marginals KL-relaxed (``rho``, ``rho_b``), the column
  update gets the exponent ``rho_b / (rho_b + eps)`` likewise;
- ``"semi_relaxed"`` (:func:`sinkhorn_semi_relaxed`): the target marginal is a KL penalty instead of a
  constraint, ``+ rho KL(gamma 1 | a)``, the bank marginal stays exact (POT's ``sinkhorn_unbalanced`` with
  ``reg_m = (rho, inf)``). The row update becomes ``phi = rho / (rho + eps) < 1``; a target patch far from
  every bank entry then carries little mass (about ``a_i exp(-excess cost / rho)``) instead of exactly
  ``a_i``. Same absorb arithmetic.

Every method shifts the cost by its row minima first (``C_ij - min_j C_ij``; the balanced plan is unchanged,
the semi-relaxed update is corrected for it), which keeps potentials small (float32 accuracy), and builds
its first kernel from an exact ``logsumexp`` row update (after one log-domain iteration from a cold start,
directly from the bank-side potentials of a warm start), so that no kernel row can underflow. A non-finite
scaling (extreme marginals) makes the absorb loop redo that step in the log domain.
"""

from __future__ import annotations

import math
import warnings

import torch

from lib.common.utils import all_finite, scratch

__all__ = ["SINKHORN_METHODS", "SinkhornWarning", "sinkhorn", "sinkhorn_absorb", "sinkhorn_log", "sinkhorn_log_domain",
           "sinkhorn_semi_relaxed", "sinkhorn_unbalanced"]


class SinkhornWarning(UserWarning):
    """Sinkhorn stopped at ``max_iter`` before the marginal error reached ``tol`` (the plan is still usable)."""


# ----------------------------------------------------------------------------------------------------------
# small kernels shared by the methods (in place on a scratch (N, M) tensor)
# ----------------------------------------------------------------------------------------------------------


def _check_weights(w, n: int, batch: torch.Size, name: str, dtype, device) -> torch.Tensor:
    if w is None:
        return torch.full(batch + (n,), 1.0 / n, dtype=dtype, device=device)
    w = torch.as_tensor(w).to(device=device, dtype=dtype)
    if w.numel() == 0:  # POT's convention: an empty histogram means uniform
        return torch.full(batch + (n,), 1.0 / n, dtype=dtype, device=device)
    if w.shape[-1] != n:
        raise ValueError(f"marginal {name} has {w.shape[-1]} entries but the cost has {n} along that side "
                         f"({'target patches' if name == 'a' else 'bank entries'}): pass one weight per "
                         f"{'row' if name == 'a' else 'bank entry'} (rebuild the bank weights with the bank)")
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


class _Problem:
    """The shifted, scaled cost ``Mr = -(C - min_j C_ij) / eps`` and the marginals, shared by the methods.

    ``phi`` is the exponent of the row update (1: exact rows; ``rho / (rho + eps)``: KL-relaxed rows, with
    ``loga`` corrected for the row shift). Potentials are kept as ``alpha = f / eps``, ``beta = g / eps`` in
    the shifted cost."""

    def __init__(self, Mr, loga, logb, a, b, shift, eps, phi, tol, max_iter, check_every, phi_b=1.0):
        self.Mr, self.loga, self.logb, self.a, self.b = Mr, loga, logb, a, b
        self.shift, self.eps, self.phi, self.phi_b = shift, eps, phi, phi_b
        self.tol, self.max_iter, self.check_every = tol, max_iter, check_every
        self.work = scratch("sinkhorn.work", Mr.shape, Mr.dtype, Mr.device)  # reused across calls (CPU)

    def row_update(self, beta, kernel: bool = False):
        """``alpha = phi (log a - log sum_j exp(Mr_ij + beta_j))``. With ``kernel`` the scratch is left holding
        ``K = exp(Mr + alpha + beta)`` of the updated potentials: for exact rows (``phi = 1``) that is the
        row-max-shifted ``exp`` the log-sum-exp already computed, times ``a_i / (its row sum)``, so one
        in-place product instead of rebuilding ``K`` (two additions and an ``exp`` over ``N x M``)."""
        if not kernel:
            return self.phi * (self.loga - _lse_cols(self.Mr, beta, self.work))
        if self.phi != 1.0:
            alpha = self.phi * (self.loga - _lse_cols(self.Mr, beta, self.work))
            _kernel(self.Mr, alpha, beta, self.work)
            return alpha
        work = torch.add(self.Mr, beta.unsqueeze(-2), out=self.work)
        m = work.amax(-1, keepdim=True)
        rows = work.sub_(m).exp_().sum(-1)  # sum_j exp(Mr_ij + beta_j - m_i), in [1, M]
        alpha = self.loga - rows.log() - m.squeeze(-1)
        work.mul_((self.a / rows).unsqueeze(-1))  # exp(alpha_i + m_i) = a_i / rows_i
        return alpha

    def log_step(self, alpha, kernel: bool = False):
        lse = _lse_rows(self.Mr, alpha, self.work)  # log column sums of exp(Mr + alpha), before the update
        beta = self.phi_b * (self.logb - lse)
        return self.row_update(beta, kernel), beta, lse

    def checked_log_step(self, alpha, beta, n: int):
        """A log-domain iteration that also measures the column-marginal error (with the log-sum-exp the row update
        reuses). Returns ``(alpha, beta, err, tv, stop)``, ``stop`` one of None, "converged", "max_iter"."""
        lse = _lse_rows(self.Mr, alpha, self.work)
        err, tv = _err((beta + lse).exp(), self.b)
        if err < self.tol:
            return alpha, beta, err, tv, "converged"
        if n >= self.max_iter:
            return alpha, beta, err, tv, "max_iter"
        beta = self.logb - lse
        return self.row_update(beta), beta, err, tv, None


# ----------------------------------------------------------------------------------------------------------
# the methods: each runs the iteration on a prepared problem and returns (alpha, beta, counters)
# ----------------------------------------------------------------------------------------------------------


def sinkhorn_log_domain(p: _Problem, alpha):
    """``method="log"``: ``logsumexp`` half-steps throughout (POT ``sinkhorn_log``)."""
    n, err, tv, stop = 0, float("inf"), float("inf"), None
    alpha, beta, _ = p.log_step(alpha)
    while not stop:
        n += 1
        if n % p.check_every == 0 or n == p.max_iter:
            alpha, beta, err, tv, stop = p.checked_log_step(alpha, beta, n)
        else:
            alpha, beta, _ = p.log_step(alpha)
    return alpha, beta, dict(n_iter=n, marginal_error=err, marginal_tv=tv, converged=stop == "converged",
                             n_absorb=0, n_log_steps=n, n_fallback=0)


def sinkhorn_absorb(p: _Problem, alpha, tau: float = 1e3, beta=None):
    """``method="absorb"``: scaling form with absorption (module docstring). With ``phi < 1`` the row
    scaling is ``u = ra * (K v)^(-phi)``, ``ra = a_eff^phi exp((phi - 1) alpha)`` fixed between absorptions.

    The kernel is first built by an exact log-domain row update, so no kernel row is all zeros: from the
    bank-side potentials ``beta`` of a warm start (iteration 0, then the scaling iterations), otherwise
    after one full log-domain iteration from ``alpha``."""
    n_absorb = n_fallback = 0
    err, tv, converged = float("inf"), float("inf"), False
    if beta is not None:
        alpha, n, n_log = p.row_update(beta, kernel=True), 0, 0
    else:
        alpha, beta, _ = p.log_step(alpha, kernel=True)  # iteration 1 in the log domain
        n, n_log = 1, 1
    K = u = v = ra = None  # until the first absorption (n_absorb == 0) p.work holds the kernel of (alpha, beta)
    log_until = 0  # after a detected underflow, stay in log steps until this iteration
    log_tau = math.log(tau)
    while True:
        check = n > 0 and (n % p.check_every == 0 or n == p.max_iter)
        if n < log_until:
            if K is not None:
                alpha, beta, K = alpha + u.log(), beta + v.log(), None
            if check and p.phi_b == 1.0:
                alpha, beta, err, tv, stop = p.checked_log_step(alpha, beta, n)
                if stop:
                    converged = stop == "converged"
                    break
            else:
                alpha, beta, _ = p.log_step(alpha)
                if n >= p.max_iter:
                    break
            n += 1
            n_log += 1
            continue
        if K is None:
            K = p.work if n_absorb == 0 else _kernel(p.Mr, alpha, beta, p.work)
            u, v = torch.ones_like(alpha), torch.ones_like(beta)
            ra = p.a if p.phi == 1.0 else torch.exp(p.phi * p.loga + (p.phi - 1.0) * alpha)
            rb = p.b if p.phi_b == 1.0 else torch.exp(p.phi_b * p.logb + (p.phi_b - 1.0) * beta)
            n_absorb += 1
        Ktu = (u.unsqueeze(-2) @ K).squeeze(-2)  # column sums of diag(u) K
        if p.phi_b == 1.0:
            if check:
                err, tv = _err(v * Ktu, p.b)
                if err < p.tol:
                    converged = True
                    break
                if n >= p.max_iter:
                    break
            v_new = p.b / Ktu
        else:  # relaxed columns: stop when the column scaling no longer moves (max relative change < tol)
            v_new = rb * Ktu.pow(-p.phi_b)
            if check:
                err, tv = float((v_new.log() - v.log()).abs().max()), 0.0
                if err < p.tol:
                    converged = True
                    break
                if n >= p.max_iter:
                    break
        Kv = (K @ v_new.unsqueeze(-1)).squeeze(-1)
        u_new = ra / Kv if p.phi == 1.0 else ra * Kv.pow(-p.phi)
        log_u, log_v = u_new.log(), v_new.log()
        # one host sync per iteration for both tests: (any bad scaling, any scaling outside [1/tau, tau])
        bad, big = torch.stack([
            ~(torch.isfinite(log_u).all() & torch.isfinite(log_v).all()),
            torch.maximum(log_u.abs().max(), log_v.abs().max()) > log_tau,
        ]).tolist()
        if bad:
            # a row/column sum underflowed: absorb the last good scalings, redo this step with logsumexp
            alpha, beta, K = alpha + u.log(), beta + v.log(), None
            log_until = (n // p.check_every + 1) * p.check_every
            n_fallback += 1
            continue
        u, v = u_new, v_new
        n += 1
        if big:
            alpha, beta, K = alpha + log_u, beta + log_v, None
    if K is not None:
        alpha, beta = alpha + u.log(), beta + v.log()
    return alpha, beta, dict(n_iter=n, marginal_error=err, marginal_tv=tv, converged=converged,
                             n_absorb=n_absorb, n_log_steps=n_log, n_fallback=n_fallback)


def sinkhorn_semi_relaxed(p: _Problem, alpha, tau: float = 1e3, beta=None):
    """``method="semi_relaxed"``: KL-relaxed target marginal (``phi = rho / (rho + eps)``), exact bank
    marginal, absorb arithmetic. The plan's total mass is ``sum_j b_j``; its row sums are not ``a``."""
    return sinkhorn_absorb(p, alpha, tau, beta)


def sinkhorn_unbalanced(p: _Problem, alpha, tau: float = 1e3, beta=None):
    """``method="unbalanced"``: both marginals KL-relaxed (``rho`` on the target side, ``rho_b`` on the bank
    side; POT ``sinkhorn_unbalanced`` with ``reg_m = (rho, rho_b)``), absorb arithmetic. Bank entries with no
    nearby target patch then carry little mass too. Stops when the column scaling changes by less than
    ``tol`` (relative) per iteration."""
    return sinkhorn_absorb(p, alpha, tau, beta)


SINKHORN_METHODS = {"log": sinkhorn_log_domain, "absorb": sinkhorn_absorb, "semi_relaxed": sinkhorn_semi_relaxed,
                    "unbalanced": sinkhorn_unbalanced}


# ----------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------


def sinkhorn(
    C,
    eps: float,
    a=None,
    b=None,
    method: str = "absorb",
    tol: float = 1e-6,
    max_iter: int = 1000,
    check_every: int = 10,
    return_log: bool = False,
    init: tuple | None = None,
    dtype: torch.dtype | None = None,
    tau: float = 1e3,
    rho: float | None = None,
    rho_b: float | None = None,
    degenerate_tv: float = 0.5,
    warn: bool = True,
    overwrite: bool = False,
):
    """Entropic OT plan of RoDA Eq. 5 (see the module docstring for the methods).

    Args:
        C: cost (..., N, M) tensor or array; leading dims are independent problems solved together.
        eps: entropic regularisation, in the units of ``C`` (normalise ``C`` first, or scale ``eps``).
        a, b: row / column marginals, (..., N) / (..., M); ``None`` means uniform ``1/N`` and ``1/M`` (Eq. 4).
        method: ``"absorb"`` (default), ``"log"`` or ``"semi_relaxed"`` (needs ``rho``).
        tol: stop once ``||gamma^T 1 - b||_2`` (POT's ``stopThr`` quantity; the row update is exact, or for
            ``semi_relaxed`` at its fixed point, after every iteration) is below ``tol`` for every problem.
        max_iter, check_every: iteration cap; the marginal error is evaluated every ``check_every`` iterations.
        return_log: return ``log gamma`` instead of ``gamma`` (no underflow; same argmaxes).
        init: warm start ``(f, g)``, the potentials ``info["f"], info["g"]`` of an earlier call (units of ``C``).
            ``f`` is used when given; ``(None, g)`` starts from the bank-side potentials only, which is what
            carries over to a *new* minibatch against the same bank.
        dtype: computation dtype; default float32, or float64 when ``C`` is float64.
        tau: absorption threshold (scalings outside ``[1/tau, tau]`` are absorbed).
        rho: KL weight of the relaxed target marginal (``semi_relaxed`` only), in the units of ``C``.
        degenerate_tv: a plan that did not converge and still has more than this fraction of its mass on the
            wrong columns raises instead of warning.
        warn: emit a :class:`SinkhornWarning` when ``max_iter`` is reached before ``tol``.
        overwrite: the solver may use ``C``'s storage as scratch (saves one (N, M) copy; ``C`` is destroyed).

    Returns:
        ``(plan, info)``: plan (..., N, M) (or its log), ``plan = exp((f_i + g_j - C_ij) / eps)``, and
        ``info = dict(n_iter, marginal_error, marginal_tv, converged, f, g, n_absorb, n_log_steps,
        n_fallback, method)``.

    Raises:
        ValueError: unknown method, ``eps <= 0``, NaN/inf in the cost, empty cost, bad marginals, or a
        numerically degenerate plan (each message names the likely fix).

    Runs under ``torch.no_grad``: RoDA never differentiates the plan (the loss differentiates ``C`` only).
    """
    if method not in SINKHORN_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(SINKHORN_METHODS)}")
    with torch.no_grad():
        out, info = _solve(C, eps, a, b, method, tol, max_iter, check_every, return_log, init, dtype, tau, rho,
                           degenerate_tv, overwrite, rho_b)
    if warn and not info["converged"]:
        warnings.warn(
            f"Sinkhorn did not converge in {info['n_iter']} iterations (marginal error {info['marginal_error']:.3g} "
            f"> tol {tol:g}); increase max_iter or eps (relative to cost scale)",
            SinkhornWarning,
            stacklevel=2,
        )
    return out, info


def sinkhorn_log(C, eps, a=None, b=None, tol: float = 1e-6, max_iter: int = 1000, check_every: int = 10,
                 return_log: bool = False, init=None, method: str = "absorb", **kwargs):
    """:func:`sinkhorn` under its earlier name (log-domain potentials, default ``method="absorb"``)."""
    return sinkhorn(C, eps, a, b, method=method, tol=tol, max_iter=max_iter, check_every=check_every,
                    return_log=return_log, init=init, **kwargs)


def _validate(C, eps, check_every, max_iter):
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
    if not all_finite(C):
        if torch.isnan(C).any():
            raise ValueError(
                "NaN in cost matrix: check the features for NaN (diverged adaptation? lower the learning rate)"
            )
        raise ValueError(
            "inf in cost matrix: check the features for inf/overflow (diverged adaptation? lower the learning rate)"
        )
    return C, eps


def _solve(C, eps, a, b, method, tol, max_iter, check_every, return_log, init, dtype, tau, rho, degenerate_tv,
           overwrite, rho_b=None):
    C, eps = _validate(C, eps, check_every, max_iter)
    N, M = C.shape[-2], C.shape[-1]
    phi = phi_b = 1.0
    if method in ("semi_relaxed", "unbalanced"):
        if rho is None or not (float(rho) > 0 and math.isfinite(float(rho))):
            raise ValueError(f"method={method!r} needs a finite rho > 0 (KL weight of the target marginal, "
                             f"in cost units), got {rho!r}")
        phi = float(rho) / (float(rho) + eps)
    if method == "unbalanced":
        rb = float(rho if rho_b is None else rho_b)
        if not (rb > 0 and math.isfinite(rb)):
            raise ValueError(f"rho_b must be a finite number > 0, got {rho_b!r}")
        phi_b = rb / (rb + eps)
    if dtype is None:
        dtype = torch.float64 if C.dtype == torch.float64 else torch.float32
    C = C.detach()
    shift = C.amin(-1, keepdim=True)
    if overwrite and C.dtype == dtype:
        Mr = C.sub_(shift)
    else:
        Mr = (C - shift).to(dtype)
    shift = shift.squeeze(-1).to(dtype)
    device, batch = Mr.device, Mr.shape[:-2]
    a = _check_weights(a, N, batch, "a", dtype, device)
    b = _check_weights(b, M, batch, "b", dtype, device)
    if phi == 1.0 and phi_b == 1.0 and (a.sum(-1) - b.sum(-1)).abs().max() > 1e-5 * b.sum(-1).abs().max():
        raise ValueError("marginals a and b must have the same total mass (this is balanced OT; "
                         "method='semi_relaxed' allows different masses)")
    loga, logb = a.log(), b.log()
    if phi != 1.0:  # the relaxed row update does not commute with the row shift: fold it into log a
        loga = loga - (1.0 - phi) / phi * shift / eps
    spread = Mr.max()
    Mr.mul_(-1.0 / eps)  # the only copy of -C/eps; every update works on it
    # Mr lies in [-spread/eps, 0] after the row shift: it overflowed exactly when the same scalar product did
    if not torch.isfinite(spread.mul(-1.0 / eps)):
        spread = spread.item()
        raise ValueError(
            f"C/eps overflows {dtype}: eps={eps:g} is far too small for cost spreads up to {spread:.3g}; "
            "increase eps (relative to cost scale) or normalise the cost (normalize_cost)"
        )
    p = _Problem(Mr, loga, logb, a, b, shift, eps, phi, tol, max_iter, check_every, phi_b)
    f0, g0 = init if init is not None else (None, None)
    beta0 = None
    if f0 is not None:
        alpha = (torch.as_tensor(f0).to(device=device, dtype=dtype).expand(batch + (N,)) - shift) / eps
    elif g0 is not None:  # bank-side potentials only (a new minibatch against the same bank): row update first
        beta0 = torch.as_tensor(g0).to(device=device, dtype=dtype).expand(batch + (M,)) / eps
        alpha = None if method != "log" else p.row_update(beta0)  # the absorb methods fuse it with their kernel
    else:
        alpha = torch.zeros(batch + (N,), dtype=dtype, device=device)
    if method == "log" and phi_b != 1.0:
        raise ValueError("the log method runs balanced OT only")
    runner = SINKHORN_METHODS[method]
    alpha, beta, info = runner(p, alpha) if method == "log" else runner(p, alpha, tau, beta0)
    err, tv = info["marginal_error"], info["marginal_tv"]
    if not (torch.isfinite(alpha).all() and torch.isfinite(beta).all()) or not math.isfinite(err):
        raise ValueError(
            f"Sinkhorn plan is numerically degenerate (non-finite potentials) at eps={eps:g}: "
            "increase eps (relative to cost scale) or max_iter"
        )
    if not info["converged"] and phi_b == 1.0 and tv > degenerate_tv:
        raise ValueError(
            f"Sinkhorn plan is numerically degenerate: after {info['n_iter']} iterations {100 * tv:.0f}% of the "
            f"column mass is misplaced (marginal error {err:.3g} > tol {tol:g}) at eps={eps:g}: "
            "increase eps (relative to cost scale) or max_iter"
        )
    out = Mr.add_(alpha.unsqueeze(-1)).add_(beta.unsqueeze(-2))  # in Mr's storage (the scratch is reused)
    del Mr, p
    if not return_log:
        out.exp_()
    info.update(f=alpha * eps + shift, g=beta * eps, method=method)
    return out, info
