"""Known-answer tests for lib.roda.alignment: each loss is ~0 when source and target match, gradients reach the
target features only through the cost, and the Gaussian losses match closed forms."""

import pytest
import torch

from lib.ot.transport import discretize, pairwise_cost
from lib.roda.alignment import (
    ALIGNMENT_LOSSES,
    continuous_ot_loss,
    gaussian_kl_loss,
    hungarian_loss,
    moment_matching_loss,
    roda_loss,
    source_stats,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _feats(n, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype)


def test_registry_and_common_signature():
    assert set(ALIGNMENT_LOSSES) == {"roda", "continuous_ot", "hungarian", "ttt++", "ttac"}
    bank = _feats(30, seed=1)
    for name, fn in ALIGNMENT_LOSSES.items():
        target = (_feats(40, seed=2) + 0.5).requires_grad_()
        loss, info = fn(target, bank)
        assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0, name
        assert isinstance(info, dict)
        loss.backward()
        assert target.grad is not None and target.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", ["roda", "continuous_ot", "hungarian"])
def test_ot_losses_zero_when_target_equals_bank(name):
    bank = _feats(20, d=4, seed=3) * 3  # well separated points
    target = bank[torch.randperm(20, generator=torch.Generator().manual_seed(0))].clone().requires_grad_()
    kwargs = {"eps": 1e-3} if name != "hungarian" else {}
    loss, _ = ALIGNMENT_LOSSES[name](target, bank, **kwargs)
    assert loss.item() < 1e-6
    loss.backward()
    assert torch.isfinite(target.grad).all()  # the l2 cost's gradient at coincident points is 0, not NaN


def test_gaussian_losses_zero_on_same_samples():
    x = _feats(200, d=6, seed=4)
    for fn, kw in [
        (moment_matching_loss, {}),
        (moment_matching_loss, {"coral_scaling": True, "mean_reduction": "mean"}),
        (gaussian_kl_loss, {}),
        (gaussian_kl_loss, {"diagonal": True}),
        (gaussian_kl_loss, {"direction": "forward"}),
        (gaussian_kl_loss, {"direction": "reverse", "ridge": 0.0}),
    ]:
        loss, _ = fn(x.clone().requires_grad_(), x)
        assert abs(loss.item()) < 1e-9, (fn.__name__, kw)


def test_moment_matching_known_value():
    bank = torch.tensor([[0.0], [2.0]])  # mean 1, unbiased var 2
    target = torch.tensor([[1.0], [5.0]], requires_grad=True)  # mean 3, var 8
    loss, info = moment_matching_loss(target, bank)
    assert loss.item() == pytest.approx(4.0 + 36.0)
    assert info["mean_term"] == pytest.approx(4.0) and info["cov_term"] == pytest.approx(36.0)
    loss_tttpp, _ = moment_matching_loss(target, bank, coral_scaling=True, mean_reduction="mean")
    assert loss_tttpp.item() == pytest.approx(4.0 + 36.0 / 4)
    # precomputed source statistics give the same loss, and the bank is then not needed
    loss_s, _ = moment_matching_loss(target, None, stats=source_stats(bank))
    assert loss_s.item() == pytest.approx(40.0)


def test_gaussian_kl_matches_torch_distributions():
    bank, target = _feats(300, d=4, seed=5), _feats(250, d=4, seed=6) * 1.5 + 0.7
    loss, info = gaussian_kl_loss(target, bank, ridge=0.0)
    MVN = torch.distributions.MultivariateNormal
    mu_s, mu_t = bank.mean(0), target.mean(0)
    ps, pt = MVN(mu_s, torch.cov(bank.T)), MVN(mu_t, torch.cov(target.T))
    kl = torch.distributions.kl_divergence
    assert info["kl_source_target"] == pytest.approx(float(kl(ps, pt)), rel=1e-9)
    assert loss.item() == pytest.approx(float(kl(ps, pt) + kl(pt, ps)), rel=1e-9)
    # diagonal version = KL between the diagonal Gaussians
    Ns = torch.distributions.Normal(mu_s, bank.var(0).sqrt())
    Nt = torch.distributions.Normal(mu_t, target.var(0).sqrt())
    loss_d, _ = gaussian_kl_loss(target, bank, ridge=0.0, diagonal=True)
    assert loss_d.item() == pytest.approx(float((kl(Ns, Nt) + kl(Nt, Ns)).sum()), rel=1e-9)
    # ridge is relative to the source scale: scaling both sets leaves the loss unchanged
    l1, _ = gaussian_kl_loss(target, bank, ridge=0.1)
    l2, _ = gaussian_kl_loss(10 * target, 10 * bank, ridge=0.1)
    assert float(l1) == pytest.approx(float(l2), rel=1e-9)


def test_gaussian_kl_float32_and_singular_target_with_ridge():
    bank = _feats(100, d=8, seed=7, dtype=torch.float32)
    target = _feats(5, d=8, seed=8, dtype=torch.float32).requires_grad_()  # 5 < 8: singular covariance
    loss, _ = gaussian_kl_loss(target, bank, ridge=1e-2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(target.grad).all()


def test_roda_gradient_only_through_cost_of_kept_pairs():
    bank = _feats(15, seed=9).requires_grad_()  # a bank with grad must still receive none
    target = (_feats(25, seed=10) + 0.3).requires_grad_()
    loss, info = roda_loss(target, bank, eps=0.05, return_plan=True)
    loss.backward()
    assert bank.grad is None
    pairs = info["pairs"]
    assert pairs.rule == "or" and info["n_pairs"] == pairs.n_pairs
    # manual loss over the same (constant) pairs gives the same gradient
    t2 = target.detach().clone().requires_grad_()
    manual = torch.stack([(t2[i] - bank.detach()[j]).norm() for i, j in zip(pairs.rows, pairs.cols)]).mean()
    manual.backward()
    torch.testing.assert_close(target.grad, t2.grad)
    assert loss.item() == pytest.approx(manual.item())
    # the pairs are Eq. 6 applied to the returned plan
    assert set(zip(discretize(info["plan"], "or").rows.tolist(), discretize(info["plan"], "or").cols.tolist())) == set(
        zip(pairs.rows.tolist(), pairs.cols.tolist())
    )
    assert info["share_rows_in_pairs"] == 1.0  # "or": every target row is pulled
    assert 0 < info["share_rows_assigned"] <= 1 and info["converged"]


def test_roda_reduction_rules_and_anomalous_counts():
    bank, target = _feats(12, seed=11), _feats(30, seed=12) + 0.2
    l_mean, i_mean = roda_loss(target, bank)
    l_sum, _ = roda_loss(target, bank, reduction="sum")
    assert float(l_sum) == pytest.approx(float(l_mean) * i_mean["n_pairs"])
    l_and, i_and = roda_loss(target, bank, rule="and")
    assert i_and["n_pairs"] <= min(12, 30) < i_mean["n_pairs"]
    anomalous = torch.zeros(30, dtype=torch.bool)
    anomalous[:5] = True
    _, info = roda_loss(target, bank, anomalous_rows=anomalous)
    assert info["n_anomalous"] == 5 and info["n_anomalous_in_pairs"] == 5
    assert 0 <= info["n_anomalous_col_argmax"] <= 5
    # warm start from the returned potentials converges in fewer iterations
    _, warm = roda_loss(target, bank, sinkhorn_kwargs={"init": (None, info["potentials"][1])})
    assert warm["sinkhorn_iters"] <= info["sinkhorn_iters"]
    with pytest.raises(ValueError, match="reduction"):
        roda_loss(target, bank, reduction="max")


def test_continuous_ot_envelope_gradient():
    bank = _feats(10, seed=13)
    target = (_feats(16, seed=14) * 0.5).requires_grad_()
    loss, info = continuous_ot_loss(target, bank, eps=0.1, return_plan=True)
    loss.backward()
    plan = info["plan"]
    assert not plan.requires_grad
    t2 = target.detach().clone().requires_grad_()
    manual = (plan * pairwise_cost(t2, bank)).sum()
    manual.backward()
    torch.testing.assert_close(target.grad, t2.grad)
    # "mean": the plan-weighted mean cost per target patch, between the min and max cost
    C = pairwise_cost(target.detach(), bank)
    assert C.min() <= loss.item() <= C.max()
    loss_sum, _ = continuous_ot_loss(target, bank, eps=0.1, reduction="sum")
    assert loss_sum.item() == pytest.approx(16 * loss.item())


def test_hungarian_loss_modes():
    bank = _feats(6, seed=15)
    target = torch.cat([bank, bank]).requires_grad_()
    loss_tile, info = hungarian_loss(target, bank, mode="tile")
    assert loss_tile.item() < 1e-6 and info["n_pairs"] == 12
    loss_sub, info_sub = hungarian_loss(target, bank, mode="subsample", seed=0)
    assert info_sub["n_pairs"] == 6


def test_errors_are_clear():
    bank = _feats(5)
    with pytest.raises(ValueError, match="target minibatch empty"):
        roda_loss(torch.zeros(0, 5), bank)
    with pytest.raises(ValueError, match="memory bank is empty"):
        continuous_ot_loss(_feats(4), torch.zeros(0, 5))
    with pytest.raises(ValueError, match="feature dims differ"):
        hungarian_loss(_feats(4, d=3), bank)
    with pytest.raises(ValueError, match="NaN in cost matrix"):
        roda_loss(torch.full((4, 5), float("nan")), bank)
    with pytest.raises(ValueError, match="at least 2"):
        moment_matching_loss(_feats(1), bank)


def test_a_runaway_cost_scale_is_a_divergence_not_an_eps_error():
    # finite features whose squared distances overflow float32: the mean cost is inf, so eps x scale would be
    # inf; the loss reports a diverged encoder instead (adapt turns it into AdaptationDiverged)
    import pytest
    import torch

    from lib.roda.alignment import roda_loss

    target = torch.full((6, 4), 1e20)
    bank = torch.zeros(5, 4)
    with pytest.raises(FloatingPointError, match="diverged adaptation"):
        roda_loss(target, bank, cost="sqeuclidean")
