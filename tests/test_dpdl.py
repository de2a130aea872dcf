"""DPDL: LightSB closed forms, the bounded DPL/DFL losses, prototype-dependent residual, top-K MIL, bad input,
the augmentation pool, and tiny end-to-end training of every method (several tests fail on the pre-#13 code)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lib.common.backbones import input_to_tap, load_backbone
from lib.common.data import DataError, Sample
from lib.common.metrics import image_auroc
from lib.dpdl.baselines import DeviationLoss, build_model, focal_loss, run_openset, run_split
from lib.dpdl.features import NormalizedInput
from lib.dpdl.model import (
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
from lib.dpdl.protocol import make_split


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
    p.init_means(x, seed=0, spread=True)
    for form in ("bridge", "mixture"):
        ll_n = p.log_likelihood(x[:12], form)
        loss = p.normal_loss(x[:12], form) + p.anomaly_loss(x[12:], ll_n.mean(), 1.0, form)
        p.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(q.grad).all() for q in p.parameters())
    assert torch.isfinite(p.residual(x)).all() and torch.isfinite(p.drift(x[:2], 0.5)).all()


def test_residual_is_measured_against_the_prototypes():
    """Eq. 22 literally is sqrt(S/eps) x (the prototypes cancel); the default residual moves with them."""
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(10, 64), dim=1)
    p = GaussianPrototypes(3, 64, eps=1e-3)
    p.init_means(x, seed=0, spread=True)
    with torch.no_grad():
        literal = p.residual(x, mode="bridge")
        c = p.assign(x)
        assert torch.allclose(literal, torch.sqrt(p.s()[c] / p.eps) * x, rtol=1e-4, atol=1e-5)
        before = p.residual(x)
        p.mu.add_(0.05)  # move every prototype by the same vector: the assignment does not change
        assert torch.equal(p.assign(x), c)
        after = p.residual(x)
        assert torch.allclose(after, before - 0.05 / torch.sqrt(p.eps * p.s()[c]), atol=1e-4)
        assert (after - before).abs().min() > 0.2
        assert torch.allclose(p.residual(x, mode="bridge"), literal, atol=1e-4)  # the literal form does not move


def _toy_features(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0]])
    normals = centres[torch.arange(n) % 2] + 0.05 * torch.randn(n, 6, generator=g)
    anomalies = torch.tensor([[0, 0, 1.0, 0, 0, 0], [0.6, 0.6, 0, 0.5, 0, 0]]) + 0.05 * torch.randn(2, 6, generator=g)
    return normals, anomalies


@pytest.mark.parametrize("form", ["bridge", "mixture"])
def test_dpl_pulls_prototypes_to_normals_and_pushes_anomalies_away(form):
    """Training Eqs. 16-17 (bounded reading) raises the normals' likelihood under the mixture above the anomalies'.

    The literal Eqs. 16 + 17 do the reverse: they descend mean log varpi(x^n) - mean log varpi(x^a).
    """
    normals, anomalies = _toy_features()
    held_normals, held_anomalies = _toy_features(seed=1)
    torch.manual_seed(0)
    p = GaussianPrototypes(2, 6, eps=0.1, s_init=1.0)  # random means, far from the normals
    with torch.no_grad():
        start = p.log_potential(normals).mean().item()
    opt = torch.optim.Adam(p.parameters(), lr=0.05)
    for _ in range(300):
        ll_n = p.log_likelihood(normals, form)
        loss = p.normal_loss(normals, form) + p.anomaly_loss(anomalies, ll_n.mean(), 1.0, form)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ll_normal = p.log_potential(held_normals)
        ll_anomaly = p.log_potential(held_anomalies)
    assert ll_normal.mean() > start + 5
    assert ll_normal.min() > ll_anomaly.max()
    if form == "mixture":  # each prototype sits on one of the two normal clusters
        assert torch.cdist(p.mu.detach(), torch.eye(6)[:2]).min(1).values.max() < 0.1


def test_dpl_losses_have_their_lower_bound():
    torch.manual_seed(0)
    p = GaussianPrototypes(2, 6, eps=0.1, s_min=1e-2)
    x = torch.randn(8, 6)
    opt = torch.optim.Adam(p.parameters(), lr=0.1)
    for _ in range(300):  # collapse the components onto the data as far as the floor allows
        loss = p.normal_loss(x[:2])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert p.normal_loss(x[:2]).item() >= p.lower_bound() - 1e-5
    assert p.anomaly_loss(x, torch.tensor(0.0)).item() >= 0


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
    centres = (torch.tensor([3.0, 0]), torch.tensor([-3.0, 0]))
    x = torch.cat([torch.randn(30, 2, generator=g) * 0.1 + c for c in centres])
    c = kmeans(x, 2, seed=0)
    assert sorted(c[:, 0].round().tolist()) == [-3.0, 3.0]
    assert torch.equal(c, kmeans(x, 2, seed=0))
    with pytest.raises(ValueError, match="lower the number of prototypes"):
        kmeans(x[:3], 5, seed=0)  # fewer points than centres


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


@pytest.mark.parametrize(("method", "kwargs"), [("devnet", {}), ("dra", {}), ("flos", {}),
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


# ---- the prototypes reach the score; the loss is bounded; every ablation switch matters --------------------


_TRAINED: dict = {}


def _trained(toy_task, seed=0, **kwargs):
    """A DPDLNet trained 30 steps on the toy task (memoised per variant: several tests share the base model)."""
    key = (seed, tuple(sorted(kwargs.items())))
    if key not in _TRAINED:
        _TRAINED[key] = _train(toy_task, seed, **kwargs)
    return _TRAINED[key]


def _train(toy_task, seed=0, **kwargs):
    samples, cache = toy_task
    normal, anomaly = cache.maps(samples[:12]), cache.maps(samples[16:20])
    torch.manual_seed(seed)
    model = DPDLNet(16, **{**dict(feature_dim=8, n_prototypes=4, hidden=16), **kwargs})
    cfg = TrainConfig(epochs=3, iterations=10, batch_size=12, lr=5e-3, seed=seed)
    fit_model(model, FeatureBank(normal, anomaly, cache.pseudo_maps(samples[:12])), cfg)
    return model, cache.maps(samples[12:16] + samples[20:])


def test_prototypes_reach_the_score(toy_task):
    model, test_maps = _train(toy_task)
    before = score_maps(model, test_maps)
    with torch.no_grad():
        model.prototypes.mu.add_(0.05)
    assert np.abs(score_maps(model, test_maps) - before).max() > 1e-3


def test_after_training_normals_are_likelier_under_the_prototypes(toy_task):
    samples, cache = toy_task
    model, _ = _trained(toy_task)
    with torch.no_grad():
        _, x_n = model.embed(cache.maps(samples[12:16]).float())
        _, x_a = model.embed(cache.maps(samples[20:]).float())
        assert model.prototypes.log_potential(x_n).mean() > model.prototypes.log_potential(x_a).mean()


def test_full_loss_is_bounded_below_on_random_data():
    """Minimising Eq. 23 hard on random maps never goes below the analytic bound (the literal Eqs. 16 + 17 diverge)."""
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(24, 16, 4, 4, generator=g)
    labels = torch.tensor([0] * 16 + [1] * 8)
    torch.manual_seed(0)
    model = DPDLNet(16, feature_dim=8, n_prototypes=4, hidden=16, s_min=1e-2)
    model.prepare(maps[:16])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(80):
        loss, _ = model.loss(maps, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert min(losses) >= model.lower_bound() - 1e-4
    assert model.lower_bound() > -10


@pytest.mark.parametrize("variant", [dict(use_dpl=False), dict(use_dfl=False), dict(heads=("r",)),
                                     dict(heads=("n", "r")), dict(heads=("a", "r")), dict(residual="bridge"),
                                     dict(dpl_form="bridge")])
def test_each_ablation_switch_changes_the_score_function(toy_task, variant):
    base, test_maps = _trained(toy_task)
    other, _ = _trained(toy_task, **variant)
    a, b = score_maps(base, test_maps), score_maps(other, test_maps)
    assert not np.allclose(a, b, atol=1e-3), variant


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error_naming_the_fix(toy_task):
    samples, cache = toy_task
    model = DPDLNet(16, feature_dim=8, n_prototypes=20)
    with pytest.raises(ValueError, match=r"n_prototypes=20 exceeds the 12 normal.*lower n_prototypes to at most 12"):
        model.prepare(cache.maps(samples[:12]).float())
    with pytest.raises(DataError, match=r"class 'green'.*has 4 anomalies, M=5.*lower n_anomalies"):
        make_split(samples[:12], samples[12:], n_anomalies=5, seed=0, setting="hard", seen_class="green", name="toy")
    tiny = MapCache(cache.extractor, resize=(3, 3), crop=None)
    with pytest.raises(ValueError, match=r"backbone cannot take 3x3 px images.*raise the image size"):
        tiny.maps(samples[:2])


# ---- the augmentation pool -----------------------------------------------------------------------------------


def test_augmentation_pool_is_seeded_and_drawn_afresh(toy_task):
    samples, cache = toy_task
    rot = cache.rotated_maps(samples[:4], 2)
    assert rot.shape == (8, 16, 4, 4) and torch.equal(rot, cache.rotated_maps(samples[:4], 2))
    assert not torch.equal(rot[:4], rot[4:]) and not torch.equal(rot[:4], cache.maps(samples[:4]))
    assert not torch.equal(cache.pseudo_maps(samples[:4], 2)[:4], cache.pseudo_maps(samples[:4], 2)[4:])
    split = make_split(samples[:12], samples[12:], n_anomalies=3, seed=0, name="toy")
    cfg = TrainConfig(epochs=1, iterations=5, batch_size=9, lr=5e-3)
    kw = dict(feature_dim=8, n_prototypes=4, hidden=16)
    a = run_split(split, cache, "dpdl", kw, cfg, pseudo_variants=2, rotation_variants=2)[0]["auroc"]
    b = run_split(split, cache, "dpdl", kw, cfg, pseudo_variants=2, rotation_variants=2)[0]["auroc"]
    c = run_split(split, cache, "dpdl", kw, cfg, pseudo_variants=1, rotation_variants=0)[0]["auroc"]
    assert a == b and np.isfinite(c)


def test_partial_fine_tuning_trains_a_private_copy_of_the_tail(toy_task):
    samples, cache = toy_task
    tail = torch.nn.Sequential(torch.nn.Conv2d(16, 12, 1), torch.nn.ReLU())
    before = [p.detach().clone() for p in tail.parameters()]
    split = make_split(samples[:12], samples[12:], n_anomalies=3, seed=0, name="toy")
    cfg = TrainConfig(epochs=1, iterations=5, batch_size=9, lr=5e-3)
    kw = dict(feature_dim=8, n_prototypes=4, hidden=16, tail=tail)
    row, model, _ = run_split(split, cache, "dpdl", kw, cfg)
    assert np.isfinite(row["auroc"]) and model.trunk.net[0].in_channels == 12
    assert all(torch.equal(a, b) for a, b in zip(before, tail.parameters()))  # the caller's module is untouched
    assert not torch.equal(model.trunk.tail[0].weight, before[0])  # the copy was trained
    assert run_split(split, cache, "dpdl", kw, cfg)[0]["auroc"] == row["auroc"]


def test_end_to_end_fine_tuning_on_cached_inputs(toy_task):
    """End to end: the cache holds normalised images and the tail is the whole network up to the deep tap;
    the tail changes the map size (32 px -> 4 x 4), which the prototypes must be built for."""
    samples, _ = toy_task
    stand_in = load_backbone("mobilenet_v2", weights="random", layers=["features.4"])
    cache = MapCache(NormalizedInput(stand_in), resize=(32, 32), crop=None)
    tail = input_to_tap(stand_in)
    split = make_split(samples[:12], samples[12:], n_anomalies=3, seed=0, name="toy")
    cfg = TrainConfig(epochs=1, iterations=3, batch_size=9, lr=5e-3)
    row, model, _ = run_split(split, cache, "dpdl", dict(feature_dim=8, n_prototypes=4, hidden=16, tail=tail), cfg)
    assert cache.maps(samples[:1]).shape == (1, 3, 32, 32)  # the cached "maps" are the inputs
    assert model.input_size == (32, 32) and model.map_size == (4, 4)
    assert np.isfinite(row["auroc"])
    assert not torch.equal(model.trunk.tail[0][0].weight, tail[0][0].weight)  # the whole network was trained
    with pytest.raises(ValueError, match="one image size"):
        model.score(cache.maps(samples[:1])[..., :16, :16].float())
