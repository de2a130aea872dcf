"""DPDL: LightSB closed forms, the DPL/DFL losses, top-K MIL, and tiny end-to-end training of every method."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lib.data import Sample
from lib.dpdl import (
    DPDLNet,
    FeatureBank,
    GaussianPrototypes,
    MapCache,
    TrainConfig,
    cutmix_pseudo_anomaly,
    dispersion_loss,
    fit_model,
    kmeans,
    score_maps,
    topk_mean,
)
from lib.metrics import image_auroc
from lib.openset import make_split
from lib.openset_baselines import DeviationLoss, build_model, focal_loss, run_openset


def _toy_prototypes(eps=0.5):
    p = GaussianPrototypes(3, 2, eps=eps)
    with torch.no_grad():
        p.mu.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0], [-0.5, 1.0]]))
        p.log_s.copy_(torch.log(torch.tensor([[1.0, 0.5], [0.3, 1.0], [2.0, 0.7]])))
        p.alpha_logits.copy_(torch.tensor([0.0, 1.0, -0.5]))
    return p


def test_log_partition_matches_monte_carlo():
    p = _toy_prototypes()
    x = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.4, 0.1]])
    g = torch.Generator().manual_seed(1)
    n = 200_000
    comp = torch.multinomial(p.log_alpha().exp().detach(), n, replacement=True, generator=g)
    with torch.no_grad():
        y = p.mu[comp] + torch.sqrt(p.eps * p.log_s.exp()[comp]) * torch.randn(n, 2, generator=g)
        mc = torch.logsumexp(x @ y.T / p.eps, dim=1) - math.log(n)
        closed = p.log_partition(x)
    assert torch.allclose(closed, mc, atol=0.02), (closed, mc)


def test_potential_is_the_mixture_density_and_plan_matches_drift_and_sampler():
    p = _toy_prototypes()
    y = torch.tensor([[0.2, 0.1], [1.2, -0.7]])
    with torch.no_grad():
        dens = sum(
            p.log_alpha()[c].exp()
            * torch.distributions.MultivariateNormal(p.mu[c], torch.diag(p.eps * p.log_s[c].exp())).log_prob(y).exp()
            for c in range(3)
        )
        assert torch.allclose(p.log_potential(y), dens.log(), atol=1e-5)
        x = torch.tensor([[0.3, -0.2]])
        # at t = 0 the drift points at the conditional mean of the plan (Eq. 13)
        assert torch.allclose(p.drift(x, 0.0).float(), p.bridge_map(x) - x, atol=1e-5)
        ends = p.sample_bridge(x.repeat(1500, 1), n_steps=60, seed=0)[-1]
        assert ends.shape == (1500, 2)
        assert torch.allclose(ends.mean(0).float(), p.bridge_map(x)[0], atol=0.05)


def test_log_domain_is_stable_at_the_papers_eps():
    torch.manual_seed(0)
    p = GaussianPrototypes(8, 256, eps=1e-3)
    x = torch.nn.functional.normalize(torch.randn(16, 256), dim=1)
    p.init_means(x, seed=0)
    loss = p.normal_loss(x[:12]) + p.anomaly_loss(x[12:])
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(q.grad).all() for q in p.parameters())
    assert torch.isfinite(p.residual(x)).all() and torch.isfinite(p.drift(x[:2], 0.5)).all()


def _train_toy(use_anomaly_loss, steps=25):
    torch.manual_seed(0)
    normals = torch.randn(64, 2) * 0.3 + torch.tensor([1.0, 0.0])
    anomaly = torch.tensor([[0.2, 1.2]])
    p = GaussianPrototypes(4, 2, eps=0.1)
    p.init_means(normals, seed=0)
    start = p.transport_log_likelihood(anomaly).item()
    opt = torch.optim.Adam(p.parameters(), lr=0.05)
    for _ in range(steps):
        loss = p.normal_loss(normals) + (p.anomaly_loss(anomaly) if use_anomaly_loss else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return start, p.transport_log_likelihood(anomaly).item(), p.transport_log_likelihood(normals).mean().item()


def test_anomaly_loss_pushes_a_seen_anomalys_likelihood_down():
    start, with_a, normal_ll = _train_toy(True)
    _, without_a, _ = _train_toy(False)
    assert with_a < start
    assert with_a < without_a
    assert with_a < normal_ll


def test_dispersion_is_lower_for_spread_than_collapsed_features():
    torch.manual_seed(0)
    spread = torch.randn(32, 16)
    collapsed = torch.ones(32, 16) + 0.01 * torch.randn(32, 16)
    assert dispersion_loss(spread, 10.0) < dispersion_loss(collapsed, 10.0) - 5
    assert dispersion_loss(collapsed, 10.0) == pytest.approx(10.0, abs=0.1)


def test_topk_mil_on_a_hand_made_map():
    score = torch.zeros(1, 1, 4, 5)  # 20 locations -> K = 2
    score[0, 0, 1, 2], score[0, 0, 3, 4], score[0, 0, 0, 0] = 5.0, 3.0, 1.0
    assert topk_mean(score, 0.1).item() == pytest.approx(4.0)
    assert topk_mean(score, 0.01).item() == pytest.approx(5.0)  # K is at least 1
    assert topk_mean(score[:, 0], 0.15).item() == pytest.approx(3.0)  # K = 3: (5 + 3 + 1) / 3


def test_kmeans_finds_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 2, generator=g) * 0.1 + c for c in (torch.tensor([3.0, 0]), torch.tensor([-3.0, 0]))])
    c = kmeans(x, 2, seed=0)
    assert sorted(c[:, 0].round().tolist()) == [-3.0, 3.0]
    assert torch.equal(c, kmeans(x, 2, seed=0))
    assert kmeans(x[:3], 5, seed=0).shape == (5, 2)  # fewer points than centres


def test_cutmix_is_seeded_and_local():
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = cutmix_pseudo_anomaly(img, torch.Generator().manual_seed(1))
    b = cutmix_pseudo_anomaly(img, torch.Generator().manual_seed(1))
    changed = (a != img).any(0).float().mean().item()
    assert torch.equal(a, b) and 0 < changed <= 0.2


def test_fixed_reference_losses():
    dev = DeviationLoss(seed=0)
    s = torch.tensor([0.0, 6.0, 1.0])
    y = torch.tensor([0.0, 1.0, 1.0])
    assert dev(s, y).item() == dev(s, y).item()  # no resampling
    assert dev(torch.tensor([6.0]), torch.tensor([1.0])).item() == pytest.approx(0.0, abs=0.2)
    assert focal_loss(torch.tensor([5.0]), torch.tensor([1.0])) < focal_loss(torch.tensor([-5.0]), torch.tensor([1.0]))


# ---- tiny end-to-end runs ---------------------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    """Random frozen conv net returning a list of maps (a FeatureExtractor stand-in)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, 2, 1),
                                       torch.nn.ReLU(), torch.nn.AvgPool2d(2))
        self.eval()

    def forward(self, x):
        return [self.net(x)]


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    """16 dark-noise normals and 8 anomalies with a bright square (two classes), 32 px."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(24):
        img = (rng.random((32, 32, 3)) * 80).astype(np.uint8)
        label = int(i >= 16)
        if label:
            y, x = rng.integers(2, 20, 2)
            img[y:y + 10, x:x + 10] = 255 if i % 2 else (0, 255, 0)
        path = root / f"{i:02d}.png"
        Image.fromarray(img).save(path)
        samples.append(Sample(str(path), label, ("white" if i % 2 else "green") if label else "good"))
    cache = MapCache(TinyNet(), resize=(32, 32), crop=None)
    return samples, cache


def test_dpdl_end_to_end_loss_decreases_and_separates(toy_task):
    samples, cache = toy_task
    normal = cache.maps(samples[:12])
    anomaly = cache.maps(samples[16:20])
    assert normal.shape == (12, 16, 4, 4) and normal.dtype == torch.float16
    model = DPDLNet(16, feature_dim=8, n_prototypes=4, hidden=16)
    cfg = TrainConfig(epochs=3, iterations=10, batch_size=12, lr=5e-3, seed=0)
    history = fit_model(model, FeatureBank(normal, anomaly, cache.pseudo_maps(samples[:12])), cfg)
    assert {"mil_a", "mil_n", "mil_r", "dpl_n", "dpl_a", "dfl"} <= set(history.columns)
    assert history["loss"].iloc[-5:].mean() < history["loss"].iloc[:5].mean()
    test = samples[12:16] + samples[20:]
    scores = score_maps(model, cache.maps(test))
    assert np.array_equal(scores, score_maps(model, cache.maps(test)))
    assert image_auroc([s.label for s in test], scores) > 0.7


@pytest.mark.parametrize("method,kwargs", [("devnet", {}), ("dra", {}), ("flos", {}),
                                           ("dpdl", dict(heads=("r",), use_dpl=False, n_prototypes=4))])
def test_every_method_trains_and_scores_deterministically(toy_task, method, kwargs):
    samples, cache = toy_task
    split = make_split(samples[:12], samples[12:], n_anomalies=3, seed=0, name="toy")
    cfg = TrainConfig(epochs=2, iterations=5, batch_size=9, lr=5e-3)
    methods = {method: (method, dict(feature_dim=8, **kwargs))}
    a, hist = run_openset([split], cache, methods, cfg, show_progress=False)
    b, _ = run_openset([split], cache, methods, cfg, show_progress=False)
    assert a["auroc"].iloc[0] == b["auroc"].iloc[0] and np.isfinite(a["auroc"].iloc[0])
    assert len(hist) == 10 and a["test_anomaly"].iloc[0] == 5


def test_build_model_rejects_unknown():
    with pytest.raises(ValueError, match="choose one of"):
        build_model("ahl", 16)
    with pytest.raises(ValueError, match="subset"):
        DPDLNet(16, heads=("x",))
