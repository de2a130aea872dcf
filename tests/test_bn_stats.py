"""BatchNorm statistics for a shifted target (lib.roda.bn_stats): known answers on a toy network."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lib.roda.bn_stats import (
    BNStatsError,
    bn_input_moments,
    gate_bn_stats,
    match_bn_stats,
    nearest_bank_distance,
    reestimate_bn_stats,
)


class Toy(nn.Module):
    """1x1 convolutions without bias (no padding: a per-channel affine change of the input stays one after
    the first convolution) and two BatchNorms whose running statistics are not the data's."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        with torch.no_grad():
            for m in (self.c1, self.c2):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
            for b in (self.b1, self.b2):  # "ImageNet" statistics: not those of the images below
                b.running_mean.copy_(torch.randn(b.num_features, generator=g))
                b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
                b.weight.copy_(torch.rand(b.num_features, generator=g) + 0.5)
                b.bias.copy_(torch.randn(b.num_features, generator=g))
        self.eval()

    def bn_modules(self):
        return [self.b1, self.b2]

    def forward(self, x):
        return self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))


def model_and_images(n=12):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, 5, 5, generator=g) * torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1) + 0.3
    return SimpleNamespace(extractor=Toy(), device=torch.device("cpu")), images


def batches(images, size=None):
    size = size or len(images)
    return [{"image": images[i:i + size]} for i in range(0, len(images), size)]


def stats(model):
    return [(b.running_mean.clone(), b.running_var.clone()) for b in model.extractor.bn_modules()]


def test_matched_statistics_leave_an_unshifted_target_in_the_reference_state():
    model, images = model_and_images()
    before = stats(model)
    reference = bn_input_moments(model, batches(images))
    match_bn_stats(model, batches(images), reference)
    for (m0, v0), (m1, v1) in zip(before, stats(model)):
        assert torch.allclose(m0, m1, atol=1e-5) and torch.allclose(v0, v1, atol=1e-5)


def test_plain_adabn_moves_an_unshifted_target_away_from_the_reference_features():
    model, images = model_and_images()
    with torch.no_grad():
        source = model.extractor(images)
    reestimate_bn_stats(model, batches(images))
    with torch.no_grad():
        adabn = model.extractor(images)
    assert (adabn - source).abs().max() > 0.1  # the reason training-referenced statistics exist


@pytest.mark.parametrize(("scale", "shift"), [(0.05, 0.4), (1.8, -0.3)])  # contrast-like, brightness-like
def test_matched_statistics_undo_a_per_channel_affine_shift(scale, shift):
    model, images = model_and_images()
    with torch.no_grad():
        clean = model.extractor(images)
    reference = bn_input_moments(model, batches(images))
    shifted = images * scale + shift
    with torch.no_grad():
        unadapted = model.extractor(shifted)
    match_bn_stats(model, batches(shifted), reference)
    with torch.no_grad():
        adapted = model.extractor(shifted)
    assert (unadapted - clean).abs().max() > 0.1
    assert torch.allclose(adapted, clean, atol=1e-3)


def test_matched_statistics_from_several_batches_remove_nearly_all_of_the_shift():
    """Several batches: each layer normalises a batch with that batch's statistics during the pass (AdaBN's
    approximation), so the result is close to, not equal to, the one-batch answer."""
    model, images = model_and_images(n=24)
    reference = bn_input_moments(model, batches(images, 6))
    for (m0, v0), (m1, v1) in zip(reference, bn_input_moments(model, batches(images))):
        assert torch.allclose(m0, m1, atol=1e-6) and torch.allclose(v0, v1, atol=1e-6)  # batching-free
    with torch.no_grad():
        clean = model.extractor(images)
    shifted = images * 0.2 + 0.5
    with torch.no_grad():
        unadapted = model.extractor(shifted)
    match_bn_stats(model, batches(shifted, 6), reference)
    with torch.no_grad():
        adapted = model.extractor(shifted)
    assert (adapted - clean).abs().max() < 0.01 * (unadapted - clean).abs().max()


def banked(n=24):
    """The toy as a PatchCore-like model: ``embed`` gives (B, pixels, 6) features and the bank holds every
    clean training patch, so a training image is at distance ~0 from the bank under the source state."""
    model, images = model_and_images(n)
    model.embed = lambda x: model.extractor(x).flatten(2).transpose(1, 2)
    with torch.no_grad():
        model.bank = model.embed(images).reshape(-1, 6)
    return model, images, bn_input_moments(model, batches(images))


def test_gate_keeps_the_matched_statistics_when_they_bring_a_shifted_target_to_the_bank():
    model, images, reference = banked()
    before = stats(model)
    shifted = images * 0.2 + 0.5  # contrast-like: a per-channel affine change that matching undoes
    gate = gate_bn_stats(model, batches(shifted, 6), reference)
    assert gate["bn_start"] == "matched"
    assert gate["nn_matched"] < 0.1 * gate["nn_source"]
    assert nearest_bank_distance(model, batches(shifted, 6)) == pytest.approx(gate["nn_matched"])
    assert any(not torch.equal(m0, m1) for (m0, _), (m1, _) in zip(before, stats(model)))


def test_gate_restores_the_source_statistics_when_matching_moves_the_target_away():
    """A target that is a subpopulation of the clean images (the darkest third: no shift, one product variant)
    sits on the bank; matching it to the moments of *all* training images moves it off, so the gate keeps
    the source state, bit for bit."""
    model, images, reference = banked()
    before = stats(model)
    subset = images[images.mean((1, 2, 3)).argsort()[:8]]
    gate = gate_bn_stats(model, batches(subset, 4), reference)
    assert gate["bn_start"] == "source"
    assert gate["nn_source"] < 0.01 < gate["nn_matched"]
    for (m0, v0), (m1, v1) in zip(before, stats(model)):
        assert torch.equal(m0, m1) and torch.equal(v0, v1)
    assert nearest_bank_distance(model, batches(subset, 4)) == pytest.approx(gate["nn_source"])


def test_bad_input_names_the_fix():
    model, images = model_and_images()
    reference = bn_input_moments(model, batches(images))
    with pytest.raises(BNStatsError, match="another backbone"):
        match_bn_stats(model, batches(images), reference[:1])
    with pytest.raises(BNStatsError, match="no images"):
        match_bn_stats(model, [], reference)
    with pytest.raises(BNStatsError, match="no images"):
        reestimate_bn_stats(model, [])
    model, _, reference = banked()
    with pytest.raises(BNStatsError, match="no images"):
        gate_bn_stats(model, [], reference)
