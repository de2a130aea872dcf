"""Known-answer tests for lib.ot.transport: costs, log-domain Sinkhorn (vs POT), Eq. 6 discretization, Hungarian."""

import math
import warnings

import numpy as np
import ot
import pytest
import torch

import lib.ot.sinkhorn as sk
import lib.ot.transport as tr
from lib.ot.transport import (
    SinkhornWarning,
    assignment_stats,
    discretize,
    hungarian_assignment,
    normalize_cost,
    pairs_to_mask,
    pairwise_cost,
    sinkhorn_log,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(n, m, d=6, seed=0, dtype=torch.float64, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(m, d, generator=g, dtype=dtype) + shift
    return x, y


# ------------------------------------------------------------------------------------------------ costs


@pytest.mark.parametrize("kind", ["l2", "sqeuclidean", "cosine"])
def test_pairwise_cost_matches_reference(kind):
    x, y = _problem(7, 5)
    C = pairwise_cost(x, y, kind)
    if kind == "l2":
        ref = torch.cdist(x, y)
    elif kind == "sqeuclidean":
        ref = torch.cdist(x, y) ** 2
    else:
        ref = 1 - torch.nn.functional.cosine_similarity(x[:, None], y[None], dim=-1)
    torch.testing.assert_close(C, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(pairwise_cost(x, y, kind, chunk=3), C)
    xb, yb = torch.stack([x, 2 * x]), torch.stack([y, y])
    torch.testing.assert_close(pairwise_cost(xb, yb, kind)[1], pairwise_cost(2 * x, y, kind))


@pytest.mark.parametrize("kind", ["l2", "sqeuclidean", "cosine"])
def test_paired_cost_is_the_diagonal_of_pairwise(kind):
    x, y = _problem(6, 6)
    torch.testing.assert_close(tr.paired_cost(x, y, kind), pairwise_cost(x, y, kind).diagonal())
    z = x.clone().requires_grad_()
    tr.paired_cost(z, x, kind).sum().backward()  # coincident rows: zero cost, finite (zero) gradient
    assert torch.isfinite(z.grad).all()


def test_pairwise_cost_gradient_finite_at_identical_points():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    C = pairwise_cost(x, x.detach(), "l2")
    assert torch.allclose(C.diagonal(), torch.zeros(4, dtype=torch.float64), atol=1e-6)
    C.sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="unknown cost kind"):
        pairwise_cost(x, x, "l1")


def test_normalize_cost_scale_detached_and_modes():
    C = torch.tensor([[1.0, 2.0], [3.0, 6.0]], requires_grad=True)
    for mode, s in [("mean", 3.0), ("median", 2.0), ("max", 6.0), ("none", 1.0)]:
        Cn, scale = normalize_cost(C, mode)
        assert float(scale) == pytest.approx(s)
        assert not scale.requires_grad and Cn.requires_grad
    Cn, scale = normalize_cost(torch.zeros(3, 2))
    assert float(scale) == 1.0 and torch.equal(Cn, torch.zeros(3, 2))
    Cb, sb = normalize_cost(torch.stack([C.detach(), 2 * C.detach()]), "max")
    assert sb.shape == (2, 1, 1) and torch.allclose(Cb[0], Cb[1])


# ------------------------------------------------------------------------------------------------ Sinkhorn


@pytest.mark.parametrize("method", ["absorb", "log"])
@pytest.mark.parametrize(("n", "m", "eps"), [(30, 20, 0.05), (12, 40, 0.2), (25, 35, 0.01)])
def test_sinkhorn_matches_pot(method, n, m, eps):
    x, y = _problem(n, m, seed=n + m)
    C, _ = normalize_cost(pairwise_cost(x, y))
    P, info = sinkhorn_log(C, eps, tol=1e-9, max_iter=20000, method=method)
    Pp, lg = ot.bregman.sinkhorn_log([], [], C.numpy(), eps, stopThr=1e-9, numItermax=20000, log=True)
    assert info["converged"]
    assert np.abs(P.numpy() - Pp).max() < 1e-8
    # same fixed point as POT: potentials agree up to the additive constant (f + c, g - c)
    df = info["f"].numpy() / eps - lg["log_u"]
    assert np.ptp(df) < 1e-6
    torch.testing.assert_close(P.sum(1), torch.full((n,), 1 / n, dtype=P.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(P.sum(0), torch.full((m,), 1 / m, dtype=P.dtype), atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_small_eps_large_cost_no_underflow(dtype):
    # a constant offset does not change the plan, but C/eps ~ 2e4 makes exp(-C/eps) exactly 0 in both dtypes:
    # the plain Sinkhorn-Knopp kernel would divide 0 by 0
    x, y = _problem(40, 30, d=3, seed=3)
    C0 = normalize_cost(pairwise_cost(x, y))[0]
    C = C0 + 1000.0
    eps = 0.05
    assert (torch.exp(-C.to(dtype) / eps) == 0).all()
    P, info = sinkhorn_log(C, eps, tol=1e-7, max_iter=5000, dtype=dtype)
    assert P.dtype == dtype and info["converged"] and torch.isfinite(P).all()
    tol_row = 1e-7 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(P.sum(1), torch.full((40,), 1 / 40, dtype=dtype), atol=tol_row, rtol=0)
    assert torch.linalg.vector_norm(P.sum(0) - 1 / 30) < 1e-7
    P0, _ = sinkhorn_log(C0, eps, tol=1e-7, max_iter=5000, dtype=dtype)
    torch.testing.assert_close(P, P0, atol=1e-7 if dtype == torch.float32 else 1e-12, rtol=0)
    Pp = ot.bregman.sinkhorn_log([], [], C.numpy(), eps, stopThr=1e-10, numItermax=5000)
    assert np.abs(P.double().numpy() - Pp).max() < 1e-6  # POT, tighter tol: differs by our tol only
    # genuinely large, spread-out costs (C/eps up to ~1e4): marginals still hold, no NaN
    Cl = pairwise_cost(30 * x[:15], 30 * y[:10], "sqeuclidean").to(dtype)
    assert (Cl / 5.0).max() > 1e3
    Pl, il = sinkhorn_log(Cl, 5.0, tol=1e-6, max_iter=3000, warn=False)
    assert torch.isfinite(Pl).all() and torch.linalg.vector_norm(Pl.sum(0) - 0.1) < 1e-3
    # float32 resolves exponents of ~1e4 to ~1e-3: rows hold to ~1e-4 relative there
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(Pl.sum(1), torch.full((15,), 1 / 15, dtype=dtype), atol=atol, rtol=0)


def test_sinkhorn_float32_default_and_float64_option():
    x, y = _problem(10, 8, seed=1)
    C = pairwise_cost(x, y)
    P32, _ = sinkhorn_log(C.float(), 0.5)
    P64, _ = sinkhorn_log(C.float(), 0.5, dtype=torch.float64)
    assert P32.dtype == torch.float32 and P64.dtype == torch.float64
    assert sinkhorn_log(C, 0.5)[0].dtype == torch.float64  # float64 input stays float64
    torch.testing.assert_close(P32.double(), P64, atol=1e-6, rtol=0)


def test_sinkhorn_batched_equals_looped():
    Cs = [normalize_cost(pairwise_cost(*_problem(15, 11, seed=s)))[0] for s in range(3)]
    Cb = torch.stack(Cs)
    Pb, info = sinkhorn_log(Cb, 0.05, tol=1e-10, max_iter=5000)
    assert Pb.shape == (3, 15, 11) and info["converged"]
    for k in range(3):
        Pk, _ = sinkhorn_log(Cs[k], 0.05, tol=1e-10, max_iter=5000)
        torch.testing.assert_close(Pb[k], Pk, atol=1e-10, rtol=0)


def test_sinkhorn_nonuniform_marginals_and_log_plan():
    x, y = _problem(9, 6, seed=4)
    C = pairwise_cost(x, y)
    a = torch.rand(9, dtype=torch.float64) + 0.1
    b = torch.rand(6, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    P, _ = sinkhorn_log(C, 0.3, a=a, b=b, tol=1e-10)
    Pp = ot.bregman.sinkhorn_log(a.numpy(), b.numpy(), C.numpy(), 0.3, stopThr=1e-10)
    assert np.abs(P.numpy() - Pp).max() < 1e-9
    L, _ = sinkhorn_log(C, 0.3, a=a, b=b, tol=1e-10, return_log=True)
    torch.testing.assert_close(L.exp(), P)
    with pytest.raises(ValueError, match="strictly positive"):
        sinkhorn_log(C, 0.3, a=torch.zeros(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="same total mass"):
        sinkhorn_log(C, 0.3, a=2 * a, b=b)


def test_sinkhorn_small_eps_approaches_exact_ot():
    x, y = _problem(10, 25, d=2, seed=5)
    C, _ = normalize_cost(pairwise_cost(x, y))
    exact = ot.emd2([], [], C.numpy())
    gaps = []
    for eps in [0.1, 0.01, 0.001]:
        P, info = sinkhorn_log(C, eps, tol=1e-8, max_iter=20000)
        assert info["converged"]
        gaps.append((float((P * C).sum()) - exact) / exact)
    assert all(g > -1e-6 for g in gaps)  # converged entropic plans are feasible: never below the LP optimum
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


def test_sinkhorn_warm_start_converges_faster():
    C = normalize_cost(pairwise_cost(*_problem(40, 30, seed=6)))[0]
    P0, info0 = sinkhorn_log(C, 0.02, tol=1e-9, max_iter=10000)
    P1, info1 = sinkhorn_log(C, 0.02, tol=1e-9, max_iter=10000, init=(info0["f"], info0["g"]))
    assert info1["n_iter"] < info0["n_iter"]
    torch.testing.assert_close(P0, P1, atol=1e-9, rtol=0)
    # bank-side potentials only (what carries over to a new minibatch): a perturbed problem still starts closer
    C2 = C + 0.01 * torch.rand(C.shape, generator=torch.Generator().manual_seed(0), dtype=C.dtype)
    _, cold = sinkhorn_log(C2, 0.02, tol=1e-9, max_iter=10000)
    P2, warm = sinkhorn_log(C2, 0.02, tol=1e-9, max_iter=10000, init=(None, info0["g"]))
    assert warm["n_iter"] < cold["n_iter"] and warm["converged"]


def test_sinkhorn_underflow_fallback_path(monkeypatch):
    # force an all-zero kernel column on the first kernel (built by the fused row update): the step must be
    # redone with logsumexp
    real_update = sk._Problem.row_update
    calls = {"n": 0}

    def broken_update(self, beta, kernel=False):
        alpha = real_update(self, beta, kernel)
        if kernel:
            calls["n"] += 1
            if calls["n"] == 1:
                self.work[..., 0] = 0.0
        return alpha

    monkeypatch.setattr(sk._Problem, "row_update", broken_update)
    C = normalize_cost(pairwise_cost(*_problem(20, 15, seed=7)))[0]
    P, info = sinkhorn_log(C, 0.05, tol=1e-9, max_iter=5000)
    assert info["n_fallback"] >= 1 and info["converged"]
    Pp = ot.bregman.sinkhorn_log([], [], C.numpy(), 0.05, stopThr=1e-9, numItermax=5000)
    assert np.abs(P.numpy() - Pp).max() < 1e-8


def test_sinkhorn_errors():
    C = torch.rand(5, 4)
    for bad_eps in [0, -1.0, float("nan")]:
        with pytest.raises(ValueError, match="eps"):
            sinkhorn_log(C, bad_eps)
    Cn = C.clone()
    Cn[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN in cost matrix.*lower the learning rate"):
        sinkhorn_log(Cn, 0.1)
    Ci = C.clone()
    Ci[0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf in cost matrix"):
        sinkhorn_log(Ci, 0.1)
    for shape in [(0, 4), (5, 0)]:
        with pytest.raises(ValueError, match="empty cost matrix.*memory bank"):
            sinkhorn_log(torch.zeros(shape), 0.1)
    with pytest.raises(ValueError, match="increase eps"):  # C/eps overflows float32
        sinkhorn_log(C * 1e3, 1e-37)
    # not converged with most of the mass on the wrong columns: degenerate, not just a warning
    Cd = torch.zeros(5, 4)
    Cd[0, 1:] = 1
    a = torch.tensor([0.9, 0.025, 0.025, 0.025, 0.025])
    with pytest.raises(ValueError, match="degenerate.*increase eps .relative to cost scale. or max_iter"):
        sinkhorn_log(Cd, 0.01, a=a, max_iter=2)


def test_sinkhorn_warns_when_not_converged():
    C = normalize_cost(pairwise_cost(*_problem(30, 20, seed=8)))[0]
    with pytest.warns(SinkhornWarning, match="did not converge"):
        P, info = sinkhorn_log(C, 0.01, tol=1e-12, max_iter=20)
    assert not info["converged"] and info["n_iter"] == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn_log(C, 0.01, tol=1e-12, max_iter=20, warn=False)


def test_sinkhorn_no_grad_and_accepts_numpy():
    x = torch.randn(6, 3, requires_grad=True)
    C = pairwise_cost(x, torch.randn(4, 3))
    P, _ = sinkhorn_log(C, 0.5)
    assert not P.requires_grad
    P2, _ = sinkhorn_log(C.detach().numpy(), 0.5)
    torch.testing.assert_close(P, P2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_sinkhorn_cuda_matches_cpu():
    C = normalize_cost(pairwise_cost(*_problem(300, 200, d=16, seed=9)))[0].float()
    Pc, ic = sinkhorn_log(C, 0.05, tol=1e-7)
    Pg, ig = sinkhorn_log(C.cuda(), 0.05, tol=1e-7)
    assert Pg.is_cuda and ig["converged"]
    torch.testing.assert_close(Pg.cpu(), Pc, atol=1e-7, rtol=1e-3)
    pairs = discretize(Pg)
    assert pairs.rows.is_cuda


# ------------------------------------------------------------------------------------------------ Eq. 6


# rows: target patches, columns: bank entries.
#   row argmaxes r = [0, 1, 1, 2]; column argmaxes c = [0, 1, 3]
#   mutual pairs: (0,0), (1,1), (3,2); row 2 -> col 1 is a "weak" row pair (col 1 prefers row 1)
PLAN = torch.tensor(
    [
        [0.30, 0.05, 0.00],
        [0.02, 0.40, 0.01],
        [0.01, 0.20, 0.05],
        [0.00, 0.10, 0.35],
    ]
)


def _pairset(p):
    return set(zip(p.rows.tolist(), p.cols.tolist()))


def test_discretize_rules_known_answers():
    assert _pairset(discretize(PLAN, "row")) == {(0, 0), (1, 1), (2, 1), (3, 2)}
    assert _pairset(discretize(PLAN, "col")) == {(0, 0), (1, 1), (3, 2)}
    assert _pairset(discretize(PLAN, "and")) == {(0, 0), (1, 1), (3, 2)}  # weak (2, 1) vanishes
    assert _pairset(discretize(PLAN, "or")) == {(0, 0), (1, 1), (2, 1), (3, 2)}  # union keeps it
    # a column argmax that is not a row argmax: only "or" and "col" contain it
    plan = torch.tensor([[0.5, 0.4], [0.1, 0.0]])  # r = [0, 0], c = [0, 0]: (0, 1) is column 1's argmax only
    assert _pairset(discretize(plan, "row")) == {(0, 0), (1, 0)}
    assert _pairset(discretize(plan, "col")) == {(0, 0), (0, 1)}
    assert _pairset(discretize(plan, "or")) == {(0, 0), (0, 1), (1, 0)}
    assert _pairset(discretize(plan, "and")) == {(0, 0)}
    for rule in ["or", "and", "row", "col"]:
        p = discretize(plan, rule)
        assert p.n_pairs == len(_pairset(p))  # no duplicates


def test_discretize_or_is_union_and_is_intersection_random():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        plan = torch.rand(30, 12, generator=g)
        row, col = _pairset(discretize(plan, "row")), _pairset(discretize(plan, "col"))
        assert _pairset(discretize(plan, "or")) == row | col
        assert _pairset(discretize(plan, "and")) == row & col
        p = discretize(plan, "or")
        mask = p.dense()
        assert mask.dtype == torch.bool and int(mask.sum()) == p.n_pairs
        assert mask.any(1).all()  # "or" keeps every target row
        torch.testing.assert_close(pairs_to_mask(p, torch.float32).sum(), torch.tensor(float(p.n_pairs)))
    # the log plan gives the same pairs
    assert _pairset(discretize(PLAN.clamp_min(1e-9).log(), "or")) == _pairset(discretize(PLAN, "or"))
    with pytest.raises(ValueError, match="unknown discretization rule"):
        discretize(PLAN, "xor")
    with pytest.raises(ValueError, match="loop over a batch"):
        discretize(PLAN[None], "or")


def test_assignment_stats_two_notions_of_assigned():
    anomalous = torch.tensor([False, False, True, True])
    s = assignment_stats(discretize(PLAN, "or"), anomalous)
    assert s["n_rows"] == 4 and s["n_pairs"] == 4
    assert s["n_rows_in_pairs"] == 4 and s["share_rows_in_pairs"] == 1.0  # "or": every row is in a pair
    assert s["n_rows_col_argmax"] == 3  # rows 0, 1, 3 are some column's argmax
    assert s["n_anomalous"] == 2 and s["n_anomalous_in_pairs"] == 2 and s["n_anomalous_col_argmax"] == 1
    assert s["share_anomalous_col_argmax"] == 0.5
    s_and = assignment_stats(discretize(PLAN, "and"), anomalous)
    assert s_and["n_rows_in_pairs"] == 3 and s_and["n_anomalous_in_pairs"] == 1
    dense = assignment_stats(discretize(PLAN, "or").dense(), anomalous)
    assert dense["n_rows_col_argmax"] is None and dense["n_pairs"] == 4
    assert assignment_stats(discretize(PLAN, "or").dense(), anomalous, plan=PLAN)["n_anomalous_col_argmax"] == 1


# ------------------------------------------------------------------------------------------------ Hungarian


def test_hungarian_recovers_permutation():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(10, 4, generator=g, dtype=torch.float64)
    perm = torch.randperm(10, generator=g)
    x = y[perm] + 1e-3 * torch.randn(10, 4, generator=g, dtype=torch.float64)
    p = hungarian_assignment(pairwise_cost(x, y))
    assert torch.equal(p.cols[torch.argsort(p.rows)], perm)


def test_hungarian_more_targets_than_bank():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4, 3, generator=g)
    x = torch.cat([y, y, y[:2]]) + 1e-3 * torch.randn(10, 3, generator=g)  # each bank entry 2-3 times
    C = pairwise_cost(x, y)
    tile = hungarian_assignment(C, mode="tile")
    assert sorted(tile.rows.tolist()) == list(range(10))  # every target row matched
    torch.testing.assert_close(tile.cols, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])[tile.rows])
    assert torch.bincount(tile.cols, minlength=4).max() <= math.ceil(10 / 4)
    sub = hungarian_assignment(C, mode="subsample", seed=3)
    assert sub.n_pairs == 4 and len(set(sub.cols.tolist())) == 4 and len(set(sub.rows.tolist())) == 4
    assert torch.equal(hungarian_assignment(C, mode="subsample", seed=3).rows, sub.rows)  # seeded
    with pytest.raises(ValueError, match="unknown Hungarian mode"):
        hungarian_assignment(C, mode="greedy")


# ------------------------------------------------------------------------------ robust OT (issue 12)


def _planted(n_in=300, n_out=12, m=60, d=8, seed=0, shift=0.5):
    """A bank of m clustered entries, a shifted target drawn from it, and n_out planted outliers far away."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(6, d, generator=g)
    bank = centres[torch.arange(m) % 6] + 0.5 * torch.randn(m, d, generator=g)
    inl = centres[torch.randint(6, (n_in,), generator=g)] + 0.5 * torch.randn(n_in, d, generator=g) + shift
    out = 4.0 * torch.randn(n_out, d, generator=g) + 12.0
    target = torch.cat([inl, out])
    outlier = torch.zeros(n_in + n_out, dtype=torch.bool)
    outlier[n_in:] = True
    return target, bank, outlier


def test_sinkhorn_method_switch_and_unknown_method():
    C = normalize_cost(pairwise_cost(*_problem(20, 15, seed=9)))[0]
    P1, _ = tr.sinkhorn(C, 0.05, method="log", tol=1e-10, max_iter=5000)
    P2, _ = tr.sinkhorn(C, 0.05, method="absorb", tol=1e-10, max_iter=5000)
    torch.testing.assert_close(P1, P2, atol=1e-10, rtol=0)
    assert set(tr.SINKHORN_METHODS) == {"log", "absorb", "semi_relaxed", "unbalanced"}
    with pytest.raises(ValueError, match="unknown method"):
        tr.sinkhorn(C, 0.05, method="greenkhorn")
    with pytest.raises(ValueError, match="needs a finite rho"):
        tr.sinkhorn(C, 0.05, method="semi_relaxed")


def test_semi_relaxed_matches_pot_unbalanced():
    x, y = _problem(25, 18, seed=10)
    C, _ = normalize_cost(pairwise_cost(x, y))
    eps, rho = 0.1, 0.3
    P, info = tr.sinkhorn(C, eps, method="semi_relaxed", rho=rho, tol=1e-11, max_iter=20000)
    a, b = np.full(25, 1 / 25), np.full(18, 1 / 18)
    Pp = ot.unbalanced.sinkhorn_unbalanced(a, b, C.numpy(), eps, (rho, float("inf")), reg_type="entropy",
                                           method="sinkhorn", numItermax=20000, stopThr=1e-13)
    assert info["converged"]
    torch.testing.assert_close(P.sum(0), torch.full((18,), 1 / 18, dtype=P.dtype), atol=1e-10, rtol=0)
    assert np.abs(P.numpy() - Pp).max() < 1e-7 * Pp.max() * 10


def test_semi_relaxed_gives_planted_outliers_little_mass():
    target, bank, outlier = _planted()
    C = pairwise_cost(target, bank)
    rho = float(C.min(1).values[~outlier].std())
    from lib.ot.epsilon import calibrate_eps
    eps = calibrate_eps(C, 8.0)
    P, info = tr.sinkhorn(C, eps, method="semi_relaxed", rho=rho, tol=1e-9, max_iter=20000)
    row = P.sum(1) * C.shape[0]  # row mass relative to the uniform 1/N
    assert row[outlier].max() < 0.05 * row[~outlier].median()
    # balanced OT must give every row exactly 1/N, outliers included: the behaviour that pulled anomalies in
    Pb, _ = tr.sinkhorn(C, eps, tol=1e-9, max_iter=20000)
    torch.testing.assert_close(Pb.sum(1) * C.shape[0], torch.ones(C.shape[0]), atol=1e-4, rtol=0)
    # the mass rule drops the outliers and keeps most inliers
    pairs = discretize(P.log(), "mass", mass_fraction=0.5, log_plan=True)
    kept = torch.zeros_like(outlier)
    kept[pairs.rows] = True
    assert not kept[outlier].any() and kept[~outlier].float().mean() > 0.6
    # Eq. 6's "or" keeps every row: outliers included
    assert discretize(Pb, "or").rows.unique().numel() == C.shape[0]


def test_calibrated_eps_gives_a_peaked_plan_and_mean_scaled_eps_does_not():
    from lib.ot.epsilon import calibrate_eps, entries_per_row

    target, bank, _ = _planted(n_out=0, d=32)
    C = pairwise_cost(target, bank)
    eps = calibrate_eps(C, 4.0)
    L, _ = tr.sinkhorn(C, eps, tol=1e-8, max_iter=20000, return_log=True, warn=False)
    spread = float(entries_per_row(L).mean())
    assert abs(spread - 4.0) < 0.4, spread  # the plan's rows spread over the requested number of entries
    # the paper-literal eps = 0.05 x mean cost spreads every row over 3x as many entries on the same data
    Lm, _ = tr.sinkhorn(C, 0.05 * float(C.mean()), tol=1e-8, max_iter=20000, return_log=True, warn=False)
    assert float(entries_per_row(Lm).mean()) > 2.5 * spread


def test_calibrate_eps_errors_name_the_fix():
    from lib.ot.epsilon import calibrate_eps

    C = pairwise_cost(*_problem(30, 10, seed=11))
    with pytest.raises(ValueError, match="between 1 and the bank size"):
        calibrate_eps(C, 50.0)
    with pytest.raises(ValueError, match="no valid eps.*entries_per_row"):
        calibrate_eps(C, 9.99, hi=1e-3)


def test_mass_rule_and_cost_scale():
    plan = torch.tensor([[0.5, 0.1], [0.05, 0.04], [0.2, 0.3]])
    pairs = discretize(plan, "mass", mass_fraction=0.5)
    assert pairs.rows.tolist() == [0, 2] and pairs.cols.tolist() == [0, 1]
    pl = discretize(plan.log(), "mass", mass_fraction=0.5, log_plan=True)
    assert pl.rows.tolist() == [0, 2]
    C = torch.rand(4, 3) + 1
    torch.testing.assert_close(tr.cost_scale(C), C.mean().reshape(1, 1))
    x, y = _problem(9, 7, dtype=torch.float32)
    torch.testing.assert_close(pairwise_cost(x, y), tr._safe_sqrt(tr._sq_dist(x, y)), atol=1e-5, rtol=0)


def test_unbalanced_matches_pot_and_drops_far_bank_entries():
    x, y = _problem(25, 18, seed=12)
    C, _ = normalize_cost(pairwise_cost(x, y))
    eps, rho = 0.1, 0.3
    P, info = tr.sinkhorn(C, eps, method="unbalanced", rho=rho, tol=1e-12, max_iter=50000)
    a, b = np.full(25, 1 / 25), np.full(18, 1 / 18)
    Pp = ot.unbalanced.sinkhorn_unbalanced(a, b, C.numpy(), eps, (rho, rho), reg_type="entropy",
                                           method="sinkhorn", numItermax=50000, stopThr=1e-14)
    assert info["converged"]
    assert np.abs(P.numpy() - Pp).max() < 1e-6 * Pp.max()
    # a bank entry far from every target patch gets little mass (balanced / semi-relaxed: exactly 1/M)
    target, bank, _ = _planted(n_out=0)
    bank = torch.cat([bank, bank[:3] + 15.0])
    C = pairwise_cost(target, bank)
    rho = float(C.min(1).values.std())
    Pu, _ = tr.sinkhorn(C, 0.5, method="unbalanced", rho=rho, tol=1e-6, max_iter=5000)
    col = Pu.sum(0) / Pu.sum() * C.shape[1]
    assert col[-3:].max() < 0.05 * col[:-3].median()


def test_column_argmax_matches_torch_with_ties_to_the_first_row():
    from lib.ot.transport import column_argmax

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2500, 37, generator=g)
    assert torch.equal(column_argmax(x, chunk=100), x.argmax(0))
    x = torch.randint(0, 3, (2500, 37), generator=g).float()  # many ties, across blocks
    first = torch.stack([torch.nonzero(col == col.max())[0, 0] for col in x.T])
    assert torch.equal(column_argmax(x, chunk=100), first)


def test_all_finite_agrees_with_isfinite():
    from lib.common.utils import all_finite

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 70, generator=g)
    assert all_finite(x) and all_finite(torch.empty(0)) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[123, 45] = bad
        assert not all_finite(y) and all_finite(y) == bool(torch.isfinite(y).all())


def test_plans_do_not_share_the_reused_scratch():
    """Sinkhorn and the RoDA loss reuse one scratch buffer per name across calls: a returned plan must not
    live in it (a later call would overwrite it), and repeated calls give the same answer."""
    from lib.common.utils import scratch
    from lib.roda.alignment import roda_loss

    a1 = scratch("test.buffer", (4, 5))
    a2 = scratch("test.buffer", (2, 3))
    assert a1.data_ptr() == a2.data_ptr() and scratch("test.other", (4, 5)).data_ptr() != a1.data_ptr()
    x, y = _problem(60, 40, seed=3)
    C1, C2 = pairwise_cost(x, y), pairwise_cost(x.flip(0), y)
    P1, _ = sinkhorn_log(C1, 0.1)
    kept = P1.clone()
    sinkhorn_log(C2, 0.1, overwrite=True)
    assert torch.equal(P1, kept)
    loss1, info1 = roda_loss(x, y, return_plan=True)
    plan = info1["plan"].clone()
    roda_loss(x.flip(0) + 1.0, y)
    assert torch.equal(info1["plan"], plan)
    loss2, info2 = roda_loss(x, y)
    assert torch.equal(loss1, loss2) and info1["n_pairs"] == info2["n_pairs"]


def test_pairwise_cost_into_a_buffer_equals_the_plain_cost():
    x, y = _problem(50, 30, seed=4)
    out = torch.empty(50, 30, dtype=x.dtype)
    for kind in ("l2", "sqeuclidean"):
        got = pairwise_cost(x, y, kind, out=out)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(got, pairwise_cost(x, y, kind))
    with pytest.raises(ValueError, match="out="):
        pairwise_cost(x, y, "cosine", out=out)
