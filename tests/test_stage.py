"""The corruption stage (``corruption.stage``): ``native`` corrupts at the originals' resolution before the resize
(directly, or emulated from a smaller stored copy), ``working`` after the resize. Known answers on small synthetic
images; each test fails when the stage is ignored."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.common import cache
from lib.common.corruptions import corrupt, corrupt_native, native_size
from lib.common.data import AnomalyDataset, Sample

NATIVE, OUT = 256, 64  # a 256 px original, a 64 px working image: a 4-fold reduction
K = NATIVE // OUT


def _noise_factor(k: int) -> float:
    """The standard deviation that i.i.d. pixel noise keeps through PIL's antialiased bilinear ``k``-fold
    reduction: the filter is a triangle of half-width ``k`` input pixels, sampled at offsets 0.5, 1.5, ...,
    k - 0.5 on either side of the output pixel's centre; per axis it keeps sum(w^2) / sum(w)^2 of the variance,
    and the two separable passes multiply, so the standard deviation keeps exactly that fraction (k = 4:
    2.625 / 16 = 0.164; about 2 / (3k) for large k)."""
    x = np.arange(k) + 0.5
    w = np.concatenate([1 - x / k, 1 - x / k])
    return float((w ** 2).sum() / w.sum() ** 2)


#: the tolerance on a ratio of two standard deviations estimated from 64 x 64 x 3 output values: the native
#: outputs overlap (support 8, stride 4: neighbour correlation 0.31 per axis, effective n ~ 12288 / 2.6), so each
#: std has a relative standard error near 1 / sqrt(2 * 4700) = 1.0% and the ratio about 1.2%; 6% is five of those
RATIO_TOL = 0.06


def _flat(size, level=128):
    return np.full((size, size, 3), level, dtype=np.uint8)


def _smooth(size):
    """A smooth image (ramps and a slow wave): resizing it commutes with pointwise operations up to rounding."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    grey = 60 + 120 * xx + 30 * np.sin(2 * np.pi * yy)
    return np.clip(np.stack([grey, grey * 0.9, grey * 0.8], -1), 0, 255).astype(np.uint8)


def _resize(image, size):
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _edge_width(image) -> float:
    """10-90 % rise of a vertical step edge, in output pixels (mean over the rows and channels)."""
    profile = image.astype(float).mean(axis=(0, 2))
    low, high = profile[:4].mean(), profile[-4:].mean()
    share = (profile - low) / (high - low)
    return float(np.argmax(share >= 0.9) - np.argmax(share >= 0.1))


def test_native_noise_keeps_the_derived_fraction_of_the_working_noise():
    native = corrupt_native(_flat(NATIVE), (OUT, OUT), "gaussian_noise", 5, seed=3)
    working = corrupt(_flat(OUT), "gaussian_noise", 5, seed=3)
    ratio = native.astype(float).std() / working.astype(float).std()
    assert ratio == pytest.approx(_noise_factor(K), rel=RATIO_TOL)
    assert _noise_factor(4) == pytest.approx(2.625 / 16)


def test_emulated_and_direct_native_corruption_agree():
    """The original (256 px) corrupted directly vs. its 128 px stored copy upsampled back to 256 px, corrupted and
    downsampled: the same noise level, the same blur width, near-identical brightness and contrast."""
    stored = NATIVE // 2
    flat_direct = corrupt_native(_flat(NATIVE), (OUT, OUT), "gaussian_noise", 5, seed=1)
    flat_emulated = corrupt_native(_flat(stored), (OUT, OUT), "gaussian_noise", 5, seed=1, native=(NATIVE, NATIVE))
    assert flat_emulated.astype(float).std() == pytest.approx(flat_direct.astype(float).std(), rel=RATIO_TOL)
    # a file smaller than its native size without the registry's size is corrupted at its own size: more noise
    own_size = corrupt_native(_flat(stored), (OUT, OUT), "gaussian_noise", 5, seed=1)
    assert own_size.astype(float).std() > 1.5 * flat_direct.astype(float).std()

    step = np.zeros((NATIVE, NATIVE, 3), dtype=np.uint8)
    step[:, NATIVE // 2:] = 200
    blur_direct = _edge_width(corrupt_native(step, (OUT, OUT), "defocus_blur", 5, seed=0))
    blur_emulated = _edge_width(corrupt_native(_resize(step, stored), (OUT, OUT), "defocus_blur", 5, seed=0,
                                               native=(NATIVE, NATIVE)))
    blur_working = _edge_width(corrupt(_resize(step, OUT), "defocus_blur", 5, seed=0))
    assert abs(blur_emulated - blur_direct) <= 1  # one output pixel
    assert blur_working >= 2.5 * blur_direct  # the disk of radius 10 shrinks about K-fold

    smooth = _smooth(NATIVE)
    for name in ("brightness", "contrast"):
        direct = corrupt_native(smooth, (OUT, OUT), name, 5, seed=0).astype(float)
        emulated = corrupt_native(_resize(smooth, stored), (OUT, OUT), name, 5, seed=0, native=(NATIVE, NATIVE))
        working = corrupt(_resize(smooth, OUT), name, 5, seed=0).astype(float)
        assert np.abs(emulated - direct).mean() < 1.5 and np.abs(working - direct).mean() < 1.5


def test_native_size_emulates_only_smaller_files():
    assert native_size((256, 256), (1024, 1024)) == (1024, 1024)  # stored smaller: emulate
    assert native_size((1024, 1024), (1024, 1024)) == (1024, 1024)  # the original itself: direct
    assert native_size((2048, 2048), (1024, 1024)) == (2048, 2048)  # larger than listed: the file is native
    assert native_size((645, 256), (None, 500)) == (1260, 500)  # KolektorSDD: the height follows the aspect
    assert native_size((300, 200), None) == (300, 200)  # a user's folder: the file's own size


def _png(tmp_path, image, name="a.png"):
    path = tmp_path / name
    Image.fromarray(image).save(path)
    return Sample(str(path), 0)


@pytest.mark.parametrize("stage", ["native", "working"])
def test_clean_images_do_not_depend_on_the_stage(tmp_path, stage):
    sample = _png(tmp_path, _smooth(NATIVE))
    base = AnomalyDataset([sample], resize=OUT, crop=48)[0]["image"]
    for corruption, severity in ((None, 5), ("clean", 5), ("gaussian_noise", 0)):
        item = AnomalyDataset([sample], resize=OUT, crop=48, corruption=corruption, severity=severity, stage=stage,
                              native=(NATIVE * 2, NATIVE * 2))[0]["image"]
        assert np.array_equal(item.numpy(), base.numpy())


def test_the_loader_applies_the_stage(tmp_path):
    """Through AnomalyDataset (file -> stage -> resize -> crop): the native stage keeps the derived fraction of
    the working stage's noise; a loader that ignored the stage would give a ratio of 1."""
    sample = _png(tmp_path, _flat(NATIVE))
    items = {stage: AnomalyDataset([sample], resize=OUT, crop=None, corruption="gaussian_noise", severity=5,
                                   stage=stage)[0]["image"].numpy() for stage in ("native", "working")}
    ratio = items["native"].std() / items["working"].std()
    assert ratio == pytest.approx(_noise_factor(K), rel=RATIO_TOL)
    with pytest.raises(ValueError, match="native, working"):
        AnomalyDataset([sample], stage="before")


def test_the_image_cache_keeps_the_stages_apart(tmp_path):
    sample = _png(tmp_path, _flat(NATIVE))
    store = cache.ImageCache()
    kwargs = dict(resize=OUT, crop=None, corruption="gaussian_noise", severity=5, seed=0, cache=store)
    working = AnomalyDataset([sample], stage="working", **kwargs)
    native = AnomalyDataset([sample], stage="native", **kwargs)
    assert working._cache_key(sample) != native._cache_key(sample)
    a, b = working[0]["image"].numpy(), native[0]["image"].numpy()
    assert len(store) == 2 and b.std() < 0.5 * a.std()  # the native item was computed, not served from working
    assert np.array_equal(native[0]["image"].numpy(), b) and store.hits == 1
    clean = [AnomalyDataset([sample], resize=OUT, crop=None, stage=s) for s in ("native", "working")]
    assert clean[0]._cache_key(sample) == clean[1]._cache_key(sample)  # clean pixels are shared by both stages


def test_profiles_carry_the_stage(tmp_path):
    import json

    from lib.experiments import profiles
    from lib.experiments.settings import SettingsError

    for name in ("real", "real_full", "full"):
        assert profiles.resolve(name, device="cpu")["corruption"]["stage"] == "native"
        assert profiles.resolve(name, device="cpu")["corruption"]["severity"] == 5
    assert profiles.resolve("smoke", device="cpu")["corruption"]["stage"] == "working"
    with pytest.raises(SettingsError, match="corruption.stage"):
        profiles.resolve("smoke", device="cpu", corruption={"stage": "after"})
    cfg = profiles.get_profile("smoke", device="cpu", out_dir=tmp_path, corruption={"stage": "native"})
    saved = json.loads((tmp_path / "results" / "smoke" / "config.json").read_text())
    assert saved["corruption"]["stage"] == "native" == cfg["corruption"]["stage"]


def test_tasks_carry_their_native_size_and_source():
    from lib.common import registry
    from lib.common.data import load_task

    assert registry.TASKS["mvtec/screw"].native == (1024, 1024)
    assert registry.TASKS["mvtec/bottle"].native == (900, 900)
    assert registry.TASKS["mvtec/tire"].native == (600, 800)
    assert registry.TASKS["ksdd"].native == (None, 500) and registry.TASKS["elpv"].native == (300, 300)
    for name in ("mvtec/screw", "mvtec/tire", "ksdd", "elpv"):
        assert registry.TASKS[name].native_source
    assert registry.TASKS["synthetic"].native is None  # generated at its stored size
    assert load_task("elpv").native == (300, 300)


def test_grid_rows_record_the_stage_and_resume_within_it(tmp_path):
    """run_grid writes the stage into every row; a finished working-stage cell does not stand in for the native
    one (the resume key holds the stage), and rows of a table from before the stage read as working."""
    import pandas as pd

    from lib.common import backbones
    from lib.experiments import profiles
    from lib.experiments import roda_grid as roda_runner

    cfg = profiles.get_profile("smoke", device="cpu", out_dir=tmp_path)
    extractor = backbones.load_backbone(cfg.backbone, weights=cfg.backbone_weights, device="cpu")
    out, methods = tmp_path / "grid.csv", {"patchcore": dict(method="patchcore")}
    roda_runner.run_grid(cfg, extractor, cfg["tasks"], ["gaussian_noise"], methods, [0], out)
    pd.read_csv(out).drop(columns="stage").to_csv(out, index=False)  # a table written before the stage existed
    native = cfg.replace(corruption={"stage": "native"})
    roda_runner.run_grid(native, extractor, cfg["tasks"], ["gaussian_noise"], methods, [0], out)
    roda_runner.run_grid(native, extractor, cfg["tasks"], ["gaussian_noise"], methods, [0], out)  # nothing to do
    table = pd.read_csv(out)
    assert sorted(table.stage) == ["native", "working"]


def test_the_recommendation_rule_on_a_known_table():
    """rank_candidates: complete and eligible candidates only, the largest mean pixel difference, ties (within a
    point) to the better worst cell, PatchCore itself when nothing beats it."""
    import pandas as pd

    from lib.reporting.recommendation import rank_candidates, recommended

    def rows(method, pixel, image=0.8, stage="working", skip=()):
        return [dict(task=t, condition=c, seed=s, method=method, severity=5, stage=stage,
                     pixel_auroc=pixel(t, c), image_auroc=image)
                for t in ("a", "b") for c in ("x", "y") for s in (0, 1) if (t, c, s) not in skip]

    grid = dict(tasks=("a", "b"), corruptions=("x", "y"), seeds=(0, 1))
    base = rows("patchcore", lambda t, c: 0.7)
    table = pd.DataFrame(base + rows("steady", lambda t, c: 0.80)
                         + rows("spiky", lambda t, c: 0.95 if c == "x" else 0.65)
                         + rows("best_but_gappy", lambda t, c: 0.99, skip={("a", "x", 1)})
                         + rows("native_only", lambda t, c: 0.99, stage="native")
                         + rows("image_loss", lambda t, c: 0.9, image=0.7))
    ranked = rank_candidates(table, **grid).set_index("method")
    assert not ranked.loc["best_but_gappy", "eligible"] and "native_only" not in ranked.index
    assert not ranked.loc["image_loss", "eligible"]  # mean image difference below 0
    # spiky: +0.10 mean but -0.05 in its worst cell; steady: +0.10, worst +0.10: tied, the better worst cell wins
    assert recommended(table, **grid) == "steady"
    assert recommended(table, worst_floor=0.2, **grid) == "patchcore"  # nothing eligible: no adaptation


def test_grid_resume_and_merge_keep_backbones_apart(tmp_path):
    """A row of another backbone does not stand in for this backbone's cell (run_grid's resume key holds the
    backbone, its histories record it), and --merge keeps both backbones' rows of one cell."""
    import sys

    import pandas as pd

    from lib.common import backbones
    from lib.experiments import profiles
    from lib.experiments import roda_grid as roda_runner

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import run_roda_grid

    cfg = profiles.get_profile("smoke", device="cpu", out_dir=tmp_path)
    extractor = backbones.load_backbone(cfg.backbone, weights=cfg.backbone_weights, device="cpu")
    out, methods = tmp_path / "grid.csv", {"patchcore": dict(method="patchcore")}
    roda_runner.run_grid(cfg, extractor, cfg["tasks"], ["gaussian_noise"], methods, [0], out)
    pd.read_csv(out).assign(backbone="other_net").to_csv(out, index=False)  # the same cell, another encoder
    roda_runner.run_grid(cfg, extractor, cfg["tasks"], ["gaussian_noise"], methods, [0], out)
    roda_runner.run_grid(cfg, extractor, cfg["tasks"], ["gaussian_noise"], methods, [0], out)  # nothing to do
    table = pd.read_csv(out)
    assert sorted(table.backbone) == sorted(["other_net", extractor.name])

    job = tmp_path / "job.csv"
    table[table.backbone == extractor.name].assign(image_auroc=0.25).to_csv(job, index=False)
    run_roda_grid.main(["--out", str(out), "--merge", str(job)])
    merged = pd.read_csv(out).set_index("backbone").image_auroc
    assert merged[extractor.name] == 0.25 and merged["other_net"] != 0.25 and len(merged) == 2
