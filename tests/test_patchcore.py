import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyExtractor

from lib.roda.patchcore import (
    BankError,
    PatchCore,
    adaptive_mean_dim1,
    aggregate,
    coverage_radius,
    faiss_available,
    greedy_coreset,
    local_neighbourhoods,
    nearest_distances,
)


def brute_force_greedy(x, n, start):
    d = torch.cdist(x.double(), x.double())
    chosen = [start]
    mind = d[start].clone()
    for _ in range(n - 1):
        i = int(torch.argmax(mind))
        chosen.append(i)
        mind = torch.minimum(mind, d[i])
    return chosen


def test_greedy_coreset_matches_brute_force_on_small_data():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    ours = greedy_coreset(x, 25, proj_dim=None, start=7).tolist()
    assert ours == brute_force_greedy(x, 25, 7)


def test_coverage_radius_shrinks_as_ratio_grows():
    x = torch.randn(2000, 32, generator=torch.Generator().manual_seed(1))
    radii = [coverage_radius(x, x[greedy_coreset(x, int(r * len(x)), proj_dim=None)]) for r in (0.01, 0.05, 0.2, 0.5)]
    assert all(a > b for a, b in zip(radii, radii[1:])), radii
    # a 100% coreset is every point once and covers every point (up to float32 round-off)
    full = greedy_coreset(x, len(x), proj_dim=None)
    assert sorted(full.tolist()) == list(range(len(x)))
    assert coverage_radius(x, x[full]) == pytest.approx(0.0, abs=1e-2)


def test_greedy_beats_random_subset_on_coverage():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(1500, 8, generator=g), 6 + 0.1 * torch.randn(20, 8, generator=g)])  # rare cluster
    greedy = coverage_radius(x, x[greedy_coreset(x, 40, proj_dim=None)])
    rand = coverage_radius(x, x[torch.randperm(len(x), generator=g)[:40]])
    assert greedy < rand


def test_projected_coreset_is_seeded_and_unique():
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(3))
    a, b = greedy_coreset(x, 50, proj_dim=16, seed=5), greedy_coreset(x, 50, proj_dim=16, seed=5)
    assert torch.equal(a, b) and len(set(a.tolist())) == 50


def test_nearest_distances_match_cdist_in_chunks():
    g = torch.Generator().manual_seed(4)
    q, m = torch.randn(97, 12, generator=g), torch.randn(41, 12, generator=g)
    d, i = nearest_distances(q, m, chunk=10)
    ref = torch.cdist(q, m)
    assert torch.allclose(d, ref.min(1).values, atol=1e-4)
    assert torch.equal(i, ref.argmin(1))


def test_empty_bank_is_a_clear_error():
    with pytest.raises(BankError, match="empty"):
        nearest_distances(torch.randn(3, 4), torch.empty(0, 4))


def test_local_neighbourhoods_and_aggregation_shapes():
    f = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    nb = local_neighbourhoods(f)
    assert nb.shape == (2, 4, 4, 27)
    # centre tap of channel 0 at (1, 1) is the value itself
    assert nb[0, 1, 1, 4] == f[0, 0, 1, 1]
    feats, grid = aggregate([torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)], pretrain_dim=32, target_dim=24)
    assert grid == (8, 8) and feats.shape == (2, 64, 24)


def official_order_aggregate(features, pretrain_dim, target_dim):
    """The official order: neighbourhoods, bilinear onto the finest grid, pool, stack, pool."""
    h, w = features[0].shape[-2:]
    pooled = []
    for f in features:
        nb = local_neighbourhoods(f).permute(0, 3, 1, 2)
        if nb.shape[-2:] != (h, w):
            nb = F.interpolate(nb, size=(h, w), mode="bilinear", align_corners=False)
        flat = nb.permute(0, 2, 3, 1).reshape(-1, 1, nb.shape[1])
        pooled.append(F.adaptive_avg_pool1d(flat, pretrain_dim))
    merged = F.adaptive_avg_pool1d(torch.cat(pooled, 1).reshape(len(pooled[0]), 1, -1), target_dim)
    return merged.reshape(features[0].shape[0], h * w, target_dim)


@pytest.mark.parametrize(("channels", "dims"), [((8, 16), (32, 24)), ((32, 96), (256, 256)), ((3, 5), (100, 7))])
def test_aggregation_equals_the_official_order(channels, dims):
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, channels[0], 8, 8, generator=g), torch.randn(2, channels[1], 4, 4, generator=g)
    ours, _ = aggregate([a, b], *dims)
    torch.testing.assert_close(ours, official_order_aggregate([a, b], *dims), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("length", "size"), [(288, 256), (864, 256), (512, 256), (100, 256), (7, 3), (5, 5)])
def test_adaptive_mean_is_torchs_adaptive_pool_bit_for_bit(length, size):
    x = torch.randn(3, length, 11, generator=torch.Generator().manual_seed(length))
    ref = F.adaptive_avg_pool1d(x.transpose(1, 2).reshape(-1, 1, length), size).reshape(3, 11, size).transpose(1, 2)
    assert torch.equal(adaptive_mean_dim1(x, size), ref)


def test_projected_coreset_selection_is_unchanged_by_the_squared_distance_loop():
    """The loop compares squared distances; the order, hence every pick, is that of the distances."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3000, 64, generator=g)
    ours = greedy_coreset(x, 60, proj_dim=16, seed=3)
    gen = torch.Generator().manual_seed(3)
    p = x @ (torch.randn(64, 16, generator=gen) / 4.0)
    d = torch.cdist(p.double(), p.double())
    starts = torch.randperm(len(x), generator=gen)[:10]
    mind, chosen = d[starts].mean(0), []
    for _ in range(60):
        i = int(torch.argmax(mind))
        chosen.append(i)
        mind = torch.minimum(mind, d[i])
        mind[i] = -1
    assert ours.tolist() == chosen


@pytest.mark.skipif(not faiss_available(), reason="optional faiss not installed (pip install faiss-cpu)")
def test_faiss_knn_agrees_with_torch():
    g = torch.Generator().manual_seed(5)
    q, m = torch.randn(500, 64, generator=g), torch.randn(300, 64, generator=g)
    d_t, i_t = nearest_distances(q, m)
    d_f, i_f = nearest_distances(q, m, backend="faiss")
    torch.testing.assert_close(d_f, d_t, atol=1e-4, rtol=1e-5)
    assert (i_f == i_t).float().mean() > 0.99  # exact search: only float ties may differ


def test_knn_backend_errors():
    with pytest.raises(ValueError, match="backend"):
        nearest_distances(torch.randn(3, 4), torch.randn(2, 4), backend="annoy")


def test_aggregation_is_differentiable():
    a = torch.randn(1, 4, 8, 8, requires_grad=True)
    b = torch.randn(1, 6, 4, 4, requires_grad=True)
    feats, _ = aggregate([a, b], 16, 16)
    feats.sum().backward()
    assert a.grad is not None and b.grad is not None and b.grad.abs().sum() > 0


def _loader(n, seed=0, anomalous=False):
    g = torch.Generator().manual_seed(seed)
    imgs = 0.5 + 0.05 * torch.randn(n, 3, 64, 64, generator=g)
    masks = torch.zeros(n, 1, 64, 64)
    if anomalous:
        imgs[:, :, 20:36, 20:36] = 1.0
        masks[:, :, 20:36, 20:36] = 1
    return [dict(image=imgs.clamp(0, 1), mask=masks, label=torch.full((n,), int(anomalous)),
                 path=[f"img{seed}_{i}" for i in range(n)])]


def test_patchcore_separates_a_planted_defect(tiny_extractor):
    model = PatchCore(tiny_extractor, coreset_ratio=0.5, pretrain_dim=32, target_dim=32, device="cpu").fit(_loader(6))
    normal, bad = model.predict(_loader(4, seed=1)), model.predict(_loader(4, seed=2, anomalous=True))
    assert bad["scores"].min() > normal["scores"].max()
    assert bad["maps"].shape == (4, 64, 64)
    # the map peaks inside the planted square
    peak = np.unravel_index(bad["maps"][0].argmax(), (64, 64))
    assert 12 <= peak[0] <= 44 and 12 <= peak[1] <= 44


def test_bank_round_trip_and_errors(tmp_path, tiny_extractor):
    model = PatchCore(tiny_extractor, coreset_ratio=0.5, pretrain_dim=16, target_dim=16, device="cpu").fit(_loader(3))
    path = model.save(tmp_path / "bank.pt")
    loaded = PatchCore.load(path, tiny_extractor, device="cpu")
    assert torch.equal(loaded.bank, model.bank) and loaded.target_dim == 16
    batch = _loader(2, seed=9)[0]["image"]
    assert torch.allclose(loaded.patch_scores(batch), model.patch_scores(batch))

    with pytest.raises(BankError, match="another backbone"):
        PatchCore.load(path, TinyExtractor(name="other"), device="cpu")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BankError, match="corrupted"):
        PatchCore.load(broken, tiny_extractor, device="cpu")
    with pytest.raises(BankError, match="does not exist"):
        PatchCore.load(tmp_path / "missing.pt", tiny_extractor, device="cpu")
    with pytest.raises(BankError, match="empty"):
        PatchCore(tiny_extractor, device="cpu").patch_scores(batch)


def test_fit_and_scores_are_bit_identical_across_runs(tiny_extractor):
    runs = []
    for _ in range(2):
        model = PatchCore(tiny_extractor, coreset_ratio=0.3, pretrain_dim=24, target_dim=16, device="cpu")
        model.fit(_loader(4))
        runs.append((model.bank, model.predict(_loader(3, seed=5, anomalous=True))["scores"]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize(("length", "size"), [(288, 256), (30, 8), (7, 3), (5, 9)])
def test_adaptive_mean_gradient(length, size):
    x = torch.randn(1, length, 2, dtype=torch.double, requires_grad=True, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(lambda y: adaptive_mean_dim1(y, size), (x,))
    ref = x.detach().clone().requires_grad_()
    w = torch.randn(1, size, 2, dtype=torch.double, generator=torch.Generator().manual_seed(2))
    (adaptive_mean_dim1(x, size) * w).sum().backward()
    pooled = F.adaptive_avg_pool1d(ref.transpose(1, 2).reshape(-1, 1, length), size).reshape(1, 2, size).transpose(1, 2)
    (pooled * w).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_coverage_counts_every_training_patch_once():
    """fit(coverage=True): each training patch counted at its nearest bank entry, so the counts sum to the
    number of training patches (the entries are training patches, each its own nearest: none is clamped)."""
    from lib.common.backbones import load_backbone
    from lib.roda.patchcore import PatchCore

    g = torch.Generator().manual_seed(0)
    model = PatchCore(load_backbone("mobilenet_v2", weights="random"), coreset_ratio=0.1, device="cpu")
    model.fit([dict(image=torch.rand(2, 3, 64, 64, generator=g))], coverage=True)
    assert model.coverage.shape == (model.bank.shape[0],) and (model.coverage >= 1).all()
    assert int(model.coverage.sum()) == model.n_train_patches
    assert PatchCore(model.extractor).fit([dict(image=torch.rand(1, 3, 64, 64, generator=g))]).coverage is None
