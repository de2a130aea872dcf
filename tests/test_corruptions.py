"""lib.common.corruptions: seeded, side-effect-free corruptions that match imagecorruptions 1.1.2 bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from lib.common import corruptions as C
from lib.common.corruptions import CORRUPTIONS, CorruptionSpec, all_corruption_names, corrupt, image_seed

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import imagecorruptions
    import imagecorruptions.corruptions as ic_impl


def textured(height=64, width=64, gray=False):
    """A smooth mid-grey texture with some colour, far from 0 and 255 (so clipping plays no role)."""
    i, j = np.mgrid[0:height, 0:width].astype(np.float64)
    base = 120 + 40 * np.sin(2 * np.pi * i / 13) * np.cos(2 * np.pi * j / 17) + 20 * (i / height)
    if gray:
        return np.clip(base, 0, 255).astype(np.uint8)
    rgb = np.stack([base, base * 0.9 + 10, base * 0.8 + 20], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def high_freq_energy(img):
    g = img.astype(np.float64).mean(axis=2)
    return float(np.mean(np.diff(g, axis=0) ** 2) + np.mean(np.diff(g, axis=1) ** 2))


RGB = textured(64, 64)
GRAY = textured(48, 80, gray=True)


def test_names():
    assert all_corruption_names() == imagecorruptions.get_corruption_names("all")
    assert len(all_corruption_names()) == 19
    assert set(CORRUPTIONS) <= set(all_corruption_names())


@pytest.mark.parametrize("name", all_corruption_names())
def test_every_corruption_runs(name):
    for img in (RGB, GRAY):
        for severity in (1, 5):
            out = corrupt(img, name, severity, seed=3)
            assert out.dtype == np.uint8
            assert out.shape == img.shape[:2] + (3,)
            assert out.flags.c_contiguous
        assert not np.array_equal(out, np.stack([img] * 3, -1) if img.ndim == 2 else img), name
    again = corrupt(RGB, name, 5, seed=3)
    assert np.array_equal(again, corrupt(RGB, name, 5, seed=3)), "same seed must give the same pixels"


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "frost", "snow", "zoom_blur", "brightness"])
def test_matches_package(name):
    """Names served by the package give exactly what imagecorruptions.corrupt gives under that seed."""
    state = np.random.get_state()
    try:
        for img in (RGB, textured(48, 80)):
            np.random.seed(11)
            ref = imagecorruptions.corrupt(img, severity=4, corruption_name=name)
            assert np.array_equal(corrupt(img, name, 4, seed=11), ref)
    finally:
        np.random.set_state(state)


@pytest.mark.parametrize("name", ["gaussian_blur", "glass_blur", "fog"])
def test_fixed_corruptions_match_patched_package(name, monkeypatch):
    """Our reimplementations equal the package's own functions once its two API breaks are undone.

    The patch is test-local (pytest's monkeypatch restores it).
    """
    from skimage.filters import gaussian

    def gaussian_with_multichannel(*args, multichannel=False, **kwargs):
        if multichannel:
            kwargs["channel_axis"] = -1
        return gaussian(*args, **kwargs)

    monkeypatch.setattr(ic_impl, "gaussian", gaussian_with_multichannel)
    monkeypatch.setattr(np, "float_", np.float64, raising=False)
    state = np.random.get_state()
    try:
        for img in (RGB, textured(33, 47)):
            for severity in (1, 3, 5):
                np.random.seed(5)
                ref = imagecorruptions.corrupt(img, severity=severity, corruption_name=name)
                assert np.array_equal(corrupt(img, name, severity, seed=5), ref), (name, severity, img.shape)
    finally:
        np.random.set_state(state)


def test_seeded_determinism_and_seed_dependence():
    a = corrupt(RGB, "gaussian_noise", 5, seed=1)
    b = corrupt(RGB, "gaussian_noise", 5, seed=1)
    c = corrupt(RGB, "gaussian_noise", 5, seed=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # frost picks its texture file at random: seeded too
    assert np.array_equal(corrupt(RGB, "frost", 3, seed=9), corrupt(RGB, "frost", 3, seed=9))


def test_global_rng_untouched():
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    for name in ("gaussian_noise", "glass_blur", "fog", "frost"):
        corrupt(RGB, name, 5, seed=0)
    assert np.array_equal(np.random.random(3), expected)


def test_identity_at_severity_zero():
    assert np.array_equal(corrupt(RGB, "gaussian_noise", 0, seed=0), RGB)
    assert np.array_equal(corrupt(RGB, None, 5, seed=0), RGB)
    gray = corrupt(GRAY, "contrast", 0)
    assert gray.shape == (48, 80, 3) and all(np.array_equal(gray[..., k], GRAY) for k in range(3))
    out = corrupt(RGB, "clean", 3)
    assert out is not RGB  # a copy, never the caller's array


def test_input_forms():
    rgba = np.concatenate([RGB, np.full(RGB.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    ref = corrupt(RGB, "contrast", 5)
    assert np.array_equal(corrupt(rgba, "contrast", 5), ref)
    assert np.array_equal(corrupt(Image.fromarray(RGB), "contrast", 5), ref)
    assert np.array_equal(corrupt(GRAY[..., None], "brightness", 2), corrupt(GRAY, "brightness", 2))
    assert np.array_equal(corrupt(Image.fromarray(GRAY), "brightness", 2), corrupt(GRAY, "brightness", 2))


def test_roda_corruptions_move_in_the_expected_direction():
    img = textured(96, 96)
    bright = corrupt(img, "brightness", 5)
    assert bright.max(axis=2).mean() > img.max(axis=2).mean() + 60  # HSV value +0.5
    low = corrupt(img, "contrast", 5)
    std_before, std_after = (a.astype(float).std(axis=(0, 1)) for a in (img, low))
    assert np.all(std_after < 0.1 * std_before)  # factor 0.05 at severity 5
    assert np.all(np.abs(low.mean(axis=(0, 1)) - img.mean(axis=(0, 1))) < 1.5)  # channel means kept
    hf = high_freq_energy(img)
    assert high_freq_energy(corrupt(img, "defocus_blur", 5)) < 0.5 * hf
    energies = [high_freq_energy(corrupt(img, "gaussian_noise", s, seed=0)) for s in range(1, 6)]
    assert energies[0] > 5 * hf
    assert all(a < b for a, b in zip(energies, energies[1:])), energies


def test_truncation_not_rounding():
    """Like imagecorruptions, float results are truncated (np.uint8), not rounded."""
    flat = np.full((32, 32, 3), 100, np.uint8)
    # contrast leaves a constant image at its mean, but 100 / 255 * 255 = 99.99999... -> 99
    assert np.unique(corrupt(flat, "contrast", 5)).tolist() == [99]
    half = corrupt(np.full((40, 40, 3), 101, np.uint8), "brightness", 1)
    # 101/255 + 0.1 = 0.49608, * 255 = 126.5 -> 126 (truncated), not 127
    assert np.unique(half).tolist() == [126]


def test_errors():
    with pytest.raises(ValueError, match="20 px.*at least 32 px: resize first"):
        corrupt(np.zeros((20, 64, 3), np.uint8), "contrast", 5)
    with pytest.raises(ValueError, match="unknown corruption 'gausian_noise'.*gaussian_noise.*saturate"):
        corrupt(RGB, "gausian_noise", 5)
    for bad in (6, -1, 2.5, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(RGB, "contrast", bad)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(RGB.astype(np.float32) / 255, "contrast", 5)
    with pytest.raises(ValueError, match="shape"):
        corrupt(np.zeros((64, 64, 2), np.uint8), "contrast", 5)


def test_image_seed_is_stable():
    # fixed values: sha256 based, so the same in every process whatever PYTHONHASHSEED is
    assert image_seed("bottle/test/good/000.png", 0) == image_seed("bottle/test/good/000.png", 0)
    assert image_seed("bottle/test/good/000.png", 0) == C.stable_hash("corruption", "bottle/test/good/000.png", 0)
    assert image_seed("a.png", 0) == 1251663500
    assert image_seed("a.png", 1) != image_seed("a.png", 0)
    assert 0 <= image_seed("b.png", 7) < 2**32


def test_corruption_spec():
    spec = CorruptionSpec("gaussian_noise", 5)
    assert spec.label == "gaussian_noise@5" and str(spec) == "gaussian_noise@5"
    assert CorruptionSpec().label == "clean" and CorruptionSpec("contrast", 0).label == "clean"
    assert CorruptionSpec.parse("defocus_blur@3") == CorruptionSpec("defocus_blur", 3)
    assert CorruptionSpec.parse("clean").is_clean
    assert CorruptionSpec.parse("contrast") == CorruptionSpec("contrast", 5)
    assert np.array_equal(spec.apply(RGB, seed=4), corrupt(RGB, "gaussian_noise", 5, seed=4))
    with pytest.raises(ValueError, match="unknown corruption"):
        CorruptionSpec("nope", 1)
    with pytest.raises(AttributeError):  # frozen dataclass: dataclasses.FrozenInstanceError
        spec.severity = 1
