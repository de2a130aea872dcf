"""Choosing the entropic regularisation ``eps`` of RoDA Eq. 5 from the data, without labels.

:func:`calibrate_eps` finds the ``eps`` at which the rows of the balanced Sinkhorn plan
(:func:`lib.ot.sinkhorn.sinkhorn`) spread over a chosen number of bank entries, measured by
:func:`entries_per_row` (the perplexity of each normalised plan row).
"""

from __future__ import annotations

import math

import torch

from lib.ot.sinkhorn import sinkhorn

__all__ = ["calibrate_eps", "entries_per_row"]

def entries_per_row(log_rows: torch.Tensor) -> torch.Tensor:
    """Effective number of entries of each row of a (log) plan: ``exp(H(p_i))`` with ``p_i`` the row
    normalised to sum 1 (the perplexity; 1 for a one-hot row, ``M`` for a uniform one)."""
    logp = log_rows - torch.logsumexp(log_rows, dim=-1, keepdim=True)
    return torch.exp(-(logp.exp() * logp).sum(-1))


def calibrate_eps(C, target_entries: float, b=None, lo: float = 1e-2, hi: float = 1e1, n_rows: int = 1024,
                  iters: int = 12, seed: int = 0, tol: float = 1e-5, max_iter: int = 300) -> float:
    """The ``eps`` (in the units of ``C``) at which the OT plan's rows spread over ``target_entries`` bank entries.

    The spread is the mean perplexity (:func:`entries_per_row`) of the rows of the balanced Sinkhorn plan
    (marginals uniform and ``b``) of ``n_rows`` random rows of ``C`` against the whole bank (the first
    adaptation batch: no labels; ``n_rows=None`` uses every row). Caveat, measured on MVTec screw: a row
    subsample smaller than the bank (1,024 rows vs 2,500 entries) forces each row to spread over at least
    ``M / n_rows`` entries, so the eps found is smaller than the full batch's: the full 15,680-row plan at that
    eps spread over 3.4 entries for a target of 8 (``results/real_full/08_first_batch.csv``). The spread grows with
    ``eps`` (towards 1 as ``eps -> 0``, towards the perplexity of ``b`` as ``eps -> inf``), so a bisection in
    ``log eps`` over ``[lo, hi] * s`` (``s`` the median nearest-neighbour cost gap) finds it; every solve is
    warm-started from the previous one and capped at ``max_iter`` iterations (the spread of a nearly converged
    plan is what is measured). Raises
    ``ValueError`` when no ``eps`` in that range reaches the target (the message gives the reachable range).
    """
    C = torch.as_tensor(C).detach()
    if C.dim() != 2 or C.numel() == 0:
        raise ValueError(f"calibrate_eps takes one non-empty (N, M) cost, got shape {tuple(C.shape)}")
    N, M = C.shape
    if not 1.0 < float(target_entries) < M:
        raise ValueError(f"target_entries must lie strictly between 1 and the bank size M={M}, got {target_entries}: "
                         "choose eps.entries_per_row in (1, M)")
    if n_rows is not None and n_rows < N:
        idx = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:n_rows].to(C.device)
        C = C[idx]
    C = C.float()
    srt = C.topk(2, dim=1, largest=False).values
    scale = float((srt[:, 1] - srt[:, 0]).median().clamp_min(1e-6))
    state = {}

    def spread(e):
        g = state.get("g")
        L, info = sinkhorn(C, e, b=b, tol=tol, max_iter=max_iter, return_log=True, warn=False,
                           init=None if g is None else (None, g))
        state["g"] = info["g"]
        return float(entries_per_row(L).mean())

    lo_e, hi_e = lo * scale, hi * scale
    s_hi = spread(hi_e)  # the low end tends to 1 entry per row (checked above: target > 1)
    if not target_entries <= s_hi:
        raise ValueError(f"no valid eps: {target_entries} entries per row is outside the range "
                         f"(1, {s_hi:.3g}] reached for eps in [{lo_e:.3g}, {hi_e:.3g}] (cost units); "
                         "choose eps.entries_per_row inside it, or widen lo/hi")
    a, z = math.log(lo_e), math.log(hi_e)
    for _ in range(iters):
        mid = 0.5 * (a + z)
        if spread(math.exp(mid)) < target_entries:
            a = mid
        else:
            z = mid
    return math.exp(0.5 * (a + z))
