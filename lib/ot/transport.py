"""Entropic optimal transport for RoDA (Sec. 3.2-3.3): costs, log-domain Sinkhorn, Eq. 6 discretization.

Notation (RoDA Eq. 4-6): ``N = N_tp`` target patches (rows, index ``i``), ``M = N_M`` memory-bank entries
(columns, index ``j``), cost ``C in R^{N x M}``, ``C_ij = ||z_i - m_j||``. Note that Algorithm 1 writes the
cost the other way round (``|D_s| x |B_t|``); every function here uses the Eq. 4 orientation, target rows
and bank columns.

The Sinkhorn solvers of Eq. 5 live in :mod:`lib.ot.sinkhorn` (``sinkhorn(C, eps, method=...)``) and are
re-exported here; this module holds what surrounds them: costs (Sec. 3.2), their normalisation, the Eq. 6
discretization of a plan into pairs, assignment counts (Fig. 5a) and the Hungarian assignment (Tab. 4).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from lib.common.utils import all_finite
from lib.ot.sinkhorn import SINKHORN_METHODS, SinkhornWarning, sinkhorn, sinkhorn_log

__all__ = [
    "SINKHORN_METHODS",
    "Pairs",
    "SinkhornWarning",
    "assignment_stats",
    "cost_scale",
    "discretize",
    "hungarian_assignment",
    "normalize_cost",
    "paired_cost",
    "pairs_to_mask",
    "pairwise_cost",
    "sinkhorn",
    "sinkhorn_log",
]

COST_KINDS = ("l2", "sqeuclidean", "cosine")
NORM_MODES = ("mean", "median", "max", "none")
RULES = ("or", "and", "row", "col", "mass")


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


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, kind: str = "l2", chunk: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Cost matrix ``C_ij = c(x_i, y_j)`` between rows of ``x`` (..., N, D) and ``y`` (..., M, D).

    ``kind``:

    - ``"l2"``: ``||x_i - y_j||_2`` (RoDA Sec. 3.2, ``C_ij = ||z_i - m_j||``),
    - ``"sqeuclidean"``: ``||x_i - y_j||_2^2``,
    - ``"cosine"``: ``1 - <x_i, y_j> / (||x_i|| ||y_j||)``.

    Computed by a matmul (``||x||^2 - 2 x.y + ||y||^2``, clamped at 0), so it costs one GEMM and no
    (N, M, D) intermediate; the price is float rounding for near-identical points (about ``1e-7 ||x||^2`` in the
    squared distance in float32). Differentiable in ``x`` and ``y``; the ``l2`` square root has gradient 0 at
    coincident points instead of NaN. ``chunk`` computes ``chunk`` rows of ``x`` at a time (peak-memory cap for
    the temporaries; the result is still the full matrix). ``out``: an (N, M) buffer to write the cost into
    (two-dimensional ``l2`` / ``sqeuclidean`` costs without gradient; e.g. :func:`lib.common.utils.scratch`).
    """
    if kind not in COST_KINDS:
        raise ValueError(f"unknown cost kind {kind!r}; choose one of {COST_KINDS}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"feature dimensions differ: x has D={x.shape[-1]}, y has D={y.shape[-1]}")
    no_graph = not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))
    if out is not None and not (no_graph and kind != "cosine" and x.dim() == 2 and y.dim() == 2 and chunk is None):
        raise ValueError("out= takes a two-dimensional l2/sqeuclidean cost computed without gradient (no chunk)")
    if chunk is not None and chunk < x.shape[-2]:
        parts = [pairwise_cost(x[..., s : s + chunk, :], y, kind) for s in range(0, x.shape[-2], chunk)]
        return torch.cat(parts, dim=-2)
    if kind == "cosine":
        xn = torch.nn.functional.normalize(x, dim=-1, eps=1e-12)
        yn = torch.nn.functional.normalize(y, dim=-1, eps=1e-12)
        return 1.0 - xn @ yn.transpose(-1, -2)
    if no_graph:
        # no autograd graph: one (N, M) buffer, updated in place (GEMM with the bank norms as its bias,
        # + target norms, clamp, sqrt)
        xx, yy = (x * x).sum(-1, keepdim=True), (y * y).sum(-1).unsqueeze(-2)
        if x.dim() == 2 and y.dim() == 2:
            d2 = torch.addmm(yy, x, y.T, alpha=-2.0, out=out)
        else:
            d2 = torch.matmul(x, y.transpose(-1, -2)).mul_(-2.0).add_(yy)
        d2.add_(xx).clamp_min_(0.0)
        return d2 if kind == "sqeuclidean" else d2.sqrt_()
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


def cost_scale(C: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """The detached scale ``s`` of :func:`normalize_cost` alone (shape ``(..., 1, 1)``), without dividing."""
    if mode not in NORM_MODES:
        raise ValueError(f"unknown cost normalisation {mode!r}; choose one of {NORM_MODES}")
    Cd = C.detach()
    if mode == "none" or Cd.numel() == 0:
        return torch.ones(Cd.shape[:-2] + (1, 1), dtype=Cd.dtype, device=Cd.device)
    flat = Cd.reshape(Cd.shape[:-2] + (-1,))
    if mode == "mean":
        s = flat.mean(-1)
    elif mode == "median":
        s = flat.median(-1).values
    else:
        s = flat.amax(-1)
    return torch.where(s > 0, s, torch.ones_like(s))[..., None, None]


def normalize_cost(C: torch.Tensor, mode: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """``(C / s, s)`` with a detached scale ``s`` so that ``eps`` is relative to the cost scale.

    ``s`` is the mean, median or max of the cost (over the last two dims, so each problem of a batch has its
    own scale, shape ``(..., 1, 1)``), or 1 for ``"none"``. An all-zero cost keeps ``s = 1``. The returned ``C/s``
    keeps the gradient of ``C`` (``s`` is a constant); the plan of ``(C/s, eps)`` equals the plan of
    ``(C, eps * s)``.
    """
    s = cost_scale(C, mode)
    return C / s, s


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


def column_argmax(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``x.argmax(0)`` of an (N, M) row-major matrix, ties to the first row, in row blocks: the running
    maximum is carried across blocks of ``chunk`` rows, so each block reduces along contiguous memory.
    (torch's strided ``argmax(0)`` over a 15,680 x 2,500 plan is several times slower on CPU.)"""
    if x.shape[0] <= chunk:
        return x.argmax(0)
    best, idx = x[:chunk].max(0)
    for start in range(chunk, x.shape[0], chunk):
        value, i = x[start:start + chunk].max(0)
        better = value > best  # strict: an equal value further down keeps the first row
        best = torch.where(better, value, best)
        idx = torch.where(better, i + start, idx)
    return idx


def discretize(plan: torch.Tensor, rule: str = "or", mass_fraction: float = 0.5, log_plan: bool = False) -> Pairs:
    """Discrete assignment ``pi*`` from a transport plan ``gamma*`` (N, M), RoDA Eq. 6.

    Eq. 6 (``rule="or"``)::

        pi_ij = 1  if  j = argmax_j' gamma_ij'   or   i = argmax_i' gamma_i'j,   else 0.

    With ``r(i) = argmax_j gamma_ij`` (each target patch's strongest bank entry) and ``c(j) = argmax_i
    gamma_ij`` (each bank entry's strongest target patch) the rules are

    - ``"row"``: ``{(i, r(i))}`` - exactly N pairs, one per target patch;
    - ``"col"``: ``{(c(j), j)}`` - exactly M pairs, one per bank entry;
    - ``"or"`` (Eq. 6 as written): the union, N to N + M pairs;
    - ``"and"``: mutual argmaxes ``{(i, r(i)) : c(r(i)) = i}`` (not in the paper; at most min(N, M) pairs);
    - ``"mass"``: row pairs whose plan mass is at least ``mass_fraction`` times the median row pair's mass,
      ``{(i, r(i)) : gamma_{i r(i)} >= mass_fraction * median_i' gamma_{i' r(i')}}`` (not in the paper). Under a
      plan whose rows may carry less than ``1/N`` (:func:`lib.ot.sinkhorn.sinkhorn` ``method="semi_relaxed"``)
      this drops the target patches the plan gives little mass (far from the bank); under a balanced plan it
      drops the rows whose mass is spread over many bank entries (ambiguous matches).

    What Eq. 6 does and does not remove: under ``"or"`` every target row keeps its row argmax, so *every*
    target patch, anomalous ones included, is pulled towards a bank entry; no target patch is dropped. What
    the discretization removes is the diffuse part of gamma (all the entropic mass off the argmaxes), and
    the pairs it adds beyond one per row are the column-argmax pairs, i.e. the target patches that some bank
    entry "wants most" receive extra weight in the mean. The paper's claim that discretization "eliminates
    weak assignments that often appear on anomalous patches" holds for the column-argmax set (an anomalous
    patch far from the bank is rarely any bank entry's argmax, see :func:`assignment_stats`) and for the
    ``"and"``/``"col"`` rules, not for the per-row pairs of ``"or"``. ``plan`` may equally be ``log gamma``
    (argmaxes are unchanged; pass ``log_plan=True`` for ``"mass"``). Ties resolve to the first index.
    """
    if rule not in RULES:
        raise ValueError(f"unknown discretization rule {rule!r}; choose one of {RULES}")
    if plan.dim() != 2:
        raise ValueError(f"discretize takes one (N, M) plan, got shape {tuple(plan.shape)}; loop over a batch")
    N, M = plan.shape
    if N == 0 or M == 0:
        raise ValueError(f"empty plan of shape {(N, M)}")
    r = plan.max(1).indices  # (N,)  bank index of each row's max (first on ties; 2x faster than argmax on CPU)
    c = column_argmax(plan)  # (M,)  target index of each column's max
    rows_r = torch.arange(N, device=plan.device)
    cols_c = torch.arange(M, device=plan.device)
    mutual = r[c] == cols_c  # column j's argmax row i=c(j) has r(i) = j, i.e. (c(j), j) is also a row pair
    if rule == "mass":
        if not mass_fraction > 0.0:
            raise ValueError(f"mass_fraction must be > 0, got {mass_fraction}")
        top = plan.gather(1, r.unsqueeze(1)).squeeze(1)  # gamma_{i r(i)} (or its log)
        log_thr = top.median() + (math.log(mass_fraction) if log_plan else 0.0)
        keep = top >= (log_thr if log_plan else mass_fraction * top.median())
        if not keep.any():
            keep = top >= top.max()
        rows, cols = rows_r[keep], r[keep]
    elif rule == "row":
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
    if not all_finite(Ct):
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
