import pytest
import torch

from lib.common.backbones import load_backbone
from lib.roda import adaptation, bn_stats
from lib.roda.adaptation import (
    AdaptationError,
    AdaptConfig,
    adapt,
    augment_batch,
    bn_state,
    restore_bn_state,
)
from lib.roda.patchcore import PatchCore


class TensorDataset(torch.utils.data.Dataset):
    def __init__(self, images, masks=None):
        self.images = images
        self.masks = masks if masks is not None else torch.zeros(len(images), 1, *images.shape[-2:])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return dict(image=self.images[i], mask=self.masks[i], label=int(self.masks[i].any()), path=str(i))


def _textures(n, seed, size=64):
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0, 1, size)
    stripes = 0.5 + 0.25 * torch.sin(12 * (base[None, :] + base[:, None]))
    return (stripes[None, None] + 0.03 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def fitted():
    ext = load_backbone("mobilenet_v2")
    model = PatchCore(ext, coreset_ratio=0.2, device="cpu").fit([dict(image=_textures(6, 0))])
    return model


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_gradient_reaches_only_bn_affine_parameters(fitted):
    ext = fitted.extractor
    before = _snapshot(ext.model)
    source = bn_state(ext)
    adapt(fitted, TensorDataset(_textures(4, 1) * 0.6), AdaptConfig(epochs=1, batch_size=4, lr=0.05,
                                                                    loss=dict(eps=0.1)), show_progress=False)
    after = _snapshot(ext.model)
    bn_affine = {n for n, p in ext.model.named_parameters() if any(p is q for q in ext.bn_affine_parameters())}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "adaptation changed nothing"
    assert changed <= bn_affine, f"non-BN-affine tensors changed: {sorted(changed - bn_affine)[:5]}"
    assert not any(p.requires_grad for p in ext.model.parameters()), "parameters left trainable"
    restore_bn_state(ext, source)
    restored = _snapshot(ext.model)
    assert all(torch.equal(v, restored[k]) for k, v in before.items())


def _relative_change(model, target, probe):
    source = bn_state(model.extractor)
    s0 = model.patch_scores(probe)
    hist = adapt(model, TensorDataset(target), AdaptConfig(epochs=1, batch_size=len(target), loss=dict(eps=0.1)),
                 show_progress=False)
    s1 = model.patch_scores(probe)
    restore_bn_state(model.extractor, source)
    assert len(hist) == 1 and torch.isfinite(torch.tensor(hist.loss.values)).all()
    return ((s1 - s0).abs().mean() / s0.mean()).item()


def test_adapting_on_clean_target_changes_scores_little(fitted):
    g = torch.Generator().manual_seed(7)
    noisy = lambda x: (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    clean = _relative_change(fitted, _textures(4, 3), _textures(3, 2))
    shifted = _relative_change(fitted, noisy(_textures(4, 3)), noisy(_textures(3, 2)))
    assert clean < 0.25, clean
    assert clean < shifted, (clean, shifted)


def test_augmentation_moves_images_and_masks_together():
    imgs = torch.rand(3, 3, 16, 16)
    masks = torch.zeros(3, 1, 16, 16)
    masks[:, :, :4, :4] = 1
    imgs[:, :, :4, :4] = 5.0  # the defect is where the mask is
    g = torch.Generator().manual_seed(0)
    x, m = augment_batch(imgs, masks, "flip_rot90", g)
    assert x.shape == (6, 3, 16, 16) and m.shape == (6, 1, 16, 16)
    assert torch.equal(x[:, 0] == 5.0, m[:, 0].bool())
    x, m = augment_batch(imgs, masks, "copy", g)
    assert torch.equal(x[:3], x[3:])
    x, _ = augment_batch(torch.rand(2, 3, 16, 8), torch.zeros(2, 1, 16, 8), "flip_rot90", g)
    assert x.shape == (4, 3, 16, 8)  # non-square: no 90-degree turns


def test_bad_input_is_a_clear_error(fitted):
    with pytest.raises(AdaptationError, match="empty"):
        adapt(fitted, TensorDataset(torch.empty(0, 3, 64, 64)), AdaptConfig(epochs=1), show_progress=False)
    with pytest.raises(AdaptationError, match="unknown method"):
        AdaptConfig(method="tent")
    other = PatchCore(fitted.extractor, device="cpu")
    other.bank, other.grid = torch.randn(10, 7), fitted.grid
    with pytest.raises(AdaptationError, match="another backbone"):
        adapt(other, TensorDataset(_textures(2, 4)), AdaptConfig(epochs=1, batch_size=2), show_progress=False)


def test_each_method_runs_one_step(fitted):
    source = bn_state(fitted.extractor)
    for method in ("roda", "continuous_ot", "hungarian", "ttt++", "ttac"):
        loss = dict(eps=0.1) if method in ("roda", "continuous_ot") else {}
        hist = adapt(fitted, TensorDataset(_textures(2, 5)), AdaptConfig(method=method, epochs=1, batch_size=2,
                                                                         loss=loss), show_progress=False)
        assert len(hist) == 1 and hist.loss.notna().all(), method
        restore_bn_state(fitted.extractor, source)


def test_fixed_step_budget_cycles_the_split(fitted):
    """``steps`` replaces ``epochs``: 5 steps over a 2-batch split run 3 passes and stop mid-pass."""
    source = bn_state(fitted.extractor)
    data = TensorDataset(_textures(4, 6))
    hist = adapt(fitted, data, AdaptConfig(epochs=1, steps=5, batch_size=2, loss=dict(eps=0.1)), show_progress=False)
    restore_bn_state(fitted.extractor, source)
    assert len(hist) == 5 and list(hist.epoch) == [0, 0, 1, 1, 2]
    assert len(adapt(fitted, data, AdaptConfig(epochs=2, batch_size=2, loss=dict(eps=0.1)), show_progress=False)) == 4
    restore_bn_state(fitted.extractor, source)
    with pytest.raises(AdaptationError, match="positive"):
        AdaptConfig(steps=0)


# ------------------------------------------------------------------------------ issue 12: robust RoDA

ROBUST = dict(eps="auto", entries_per_row=4, ot="semi_relaxed", rho="auto", weights="coverage", rule="mass")


def _defect(images, seed):
    """Bright square defects in the first half of the images, with their masks."""
    x = images.clone()
    masks = torch.zeros(len(x), 1, *x.shape[-2:])
    for k in range(len(x) // 2):
        x[k, :, 20:36, 20:36] = 1.0
        masks[k, :, 20:36, 20:36] = 1
    return x, masks


def test_robust_adaptation_lowers_loss_and_raises_separation(fitted):
    from lib.experiments.roda_grid import coverage_counts

    source = bn_state(fitted.extractor)
    g = torch.Generator().manual_seed(11)
    images, masks = _defect(0.55 * _textures(6, 12) + 0.1 * torch.randn(6, 3, 64, 64, generator=g), 0)
    images = images.clamp(0, 1)
    with torch.no_grad():
        train = fitted.embed(_textures(6, 0)).reshape(-1, fitted.bank.shape[1])
    weights = coverage_counts(train, fitted.bank)

    def separation():
        s = fitted.patch_scores(images)  # (B, h, w)
        an = adaptation.anomalous_patches(masks, s.shape[-2:], 0.5).reshape(s.shape)
        return float(s[an].mean() / s[~an].mean())

    sep0 = separation()
    conf = AdaptConfig(epochs=4, batch_size=6, lr=0.01, augment="none", loss=dict(ROBUST))
    hist = adapt(fitted, TensorDataset(images, masks), conf, show_progress=False, bank_weights=weights)
    sep1 = separation()
    restore_bn_state(fitted.extractor, source)
    assert len(hist) == 4 and hist.loss.iloc[-1] < hist.loss.iloc[0]
    assert hist.nn_distance.iloc[-1] < hist.nn_distance.iloc[0]
    assert sep1 > sep0, (sep0, sep1)
    # the planted defects are dropped more often than normal patches
    assert (hist.share_anomalous_kept < hist.share_normal_kept).all()
    assert hist.eps_cost.nunique() == 1 and hist.rho_cost.iloc[0] > 0  # fixed once, on the first batch


def test_bn_train_mode_updates_uses_and_restores_running_stats(fitted):
    ext = fitted.extractor
    source = bn_state(ext)
    probe = _textures(2, 13)
    s_before = fitted.patch_scores(probe)
    bn = ext.bn_modules()[0]
    mean0 = bn.running_mean.clone()
    adapt(fitted, TensorDataset(0.6 * _textures(4, 14)), AdaptConfig(epochs=1, batch_size=4, bn_mode="train",
                                                                      lr=0.0, loss=dict(eps=0.1)), show_progress=False)
    assert not torch.equal(bn.running_mean, mean0), "running statistics were not updated"
    assert not bn.training, "the extractor was left in train mode"
    s_after = fitted.patch_scores(probe)  # eval mode: uses the updated running statistics (lr 0: affine unchanged)
    assert not torch.allclose(s_before, s_after)
    restore_bn_state(ext, source)
    torch.testing.assert_close(bn.running_mean, mean0)
    torch.testing.assert_close(fitted.patch_scores(probe), s_before)


def test_robust_bad_input_names_the_fix(fitted):
    data = TensorDataset(_textures(3, 15))
    with pytest.raises(AdaptationError, match="fewer than one batch.*batch_size"):
        adapt(fitted, data, AdaptConfig(epochs=1, batch_size=4, drop_last=True), show_progress=False)
    with pytest.raises(AdaptationError, match="coverage counts"):
        adapt(fitted, data, AdaptConfig(epochs=1, batch_size=3, loss=dict(ROBUST)), show_progress=False)
    short = torch.ones(fitted.bank.shape[0] - 1)
    with pytest.raises(AdaptationError, match="bank_weights has .* entries but the bank has"):
        adapt(fitted, data, AdaptConfig(epochs=1, batch_size=3, loss=dict(ROBUST)), show_progress=False,
              bank_weights=short)
    too_many = fitted.bank.shape[0] - 0.5
    with pytest.raises(AdaptationError, match="no valid eps"):
        adapt(fitted, data, AdaptConfig(epochs=1, batch_size=3, loss=dict(ROBUST, entries_per_row=too_many)),
              show_progress=False, bank_weights=torch.ones(fitted.bank.shape[0]))


def test_drop_last_and_stopping_rule(fitted):
    source = bn_state(fitted.extractor)
    data = TensorDataset(_textures(5, 16))
    hist = adapt(fitted, data, AdaptConfig(epochs=2, batch_size=2, drop_last=True, loss=dict(eps=0.1)),
                 show_progress=False)
    assert len(hist) == 4 and (hist.n_target_patches == hist.n_target_patches.iloc[0]).all()
    restore_bn_state(fitted.extractor, source)
    # lr 0, no augmentation: the nearest-bank distance cannot fall, so the rule stops at min_epochs
    hist = adapt(fitted, data, AdaptConfig(epochs=6, batch_size=5, lr=0.0, augment="none",
                                           stop=dict(rel_tol=0.01, min_epochs=2),
                                           loss=dict(eps=0.1)), show_progress=False)
    assert hist.epoch.max() == 1 and hist.stopped.iloc[-1]
    restore_bn_state(fitted.extractor, source)


def test_scoring_never_touches_batchnorm_statistics():
    """Regression: the cache fingerprint's dry run restored ``extractor.train(extractor.training)``, and a fresh
    wrapper's flag was True, so every BatchNorm ran on batch statistics and each scored batch overwrote the
    running statistics (scores depended on batch composition and on what was scored before)."""
    from lib.common.cache import extractor_fingerprint

    ext = load_backbone("mobilenet_v2")
    extractor_fingerprint(ext)  # what every bank/feature cache key computes first
    assert not ext.training and not any(m.training for m in ext.modules())
    model = PatchCore(ext, coreset_ratio=0.2, device="cpu").fit([dict(image=_textures(4, 0))])
    before = bn_state(ext)
    shifted = [dict(image=_textures(3, 5) * 0.3, mask=torch.zeros(3, 1, 64, 64), label=torch.zeros(3),
                    path=["a", "b", "c"])]
    first = model.predict(shifted, keep_maps=False)["scores"]
    again = model.predict(shifted, keep_maps=False)["scores"]
    assert all(torch.equal(v, bn_state(ext)[k]) for k, v in before.items()), "scoring changed BN statistics"
    assert torch.equal(torch.as_tensor(first), torch.as_tensor(again))


def test_bn_init_target_reestimates_statistics_and_restores(fitted):
    """AdaBN (``bn_init="target"``): the running statistics become the split's own (a contrast-reduced split
    gives a smaller first-layer variance), the affine parameters stay, and the source state comes back."""
    ext = fitted.extractor
    source = bn_state(ext)
    momenta = [bn.momentum for bn in ext.bn_modules()]
    split = TensorDataset(0.5 + 0.1 * (_textures(4, 2) - 0.5))  # contrast cut to a tenth
    seen = bn_stats.reestimate_bn_stats(fitted, torch.utils.data.DataLoader(split, batch_size=2))
    assert seen == 4
    first = ext.bn_modules()[0]
    assert float(first.running_var.mean()) < 0.5 * float(source["0.running_var"].mean())
    assert torch.equal(first.weight, source["0.weight"]) and [bn.momentum for bn in ext.bn_modules()] == momenta
    assert not any(m.training for m in ext.modules())
    restore_bn_state(ext, source)
    # method="patchcore" with bn_init="target" is the statistics alone: no history, no affine change
    hist = adapt(fitted, split, AdaptConfig(method="patchcore", bn_init="target", batch_size=2), show_progress=False)
    assert len(hist) == 0 and torch.equal(ext.bn_modules()[0].weight, source["0.weight"])
    assert not torch.equal(ext.bn_modules()[0].running_mean, source["0.running_mean"])
    restore_bn_state(ext, source)
    with pytest.raises(AdaptationError, match="bn_init"):
        AdaptConfig(bn_init="adabn")


def test_bn_init_matched_on_the_real_encoder_keeps_an_unshifted_split_and_needs_its_reference(fitted):
    """``bn_init="matched"`` on the bundled MobileNetV2: the training textures themselves as the target give
    back the source features (one batch: exact up to float error); without the reference it is a clear
    error; a contrast-cut split moves the statistics."""
    ext = fitted.extractor
    source = bn_state(ext)
    train = TensorDataset(_textures(4, 3))
    reference = bn_stats.bn_input_moments(fitted, torch.utils.data.DataLoader(train, batch_size=4))
    with pytest.raises(AdaptationError, match="bn_reference"):
        adapt(fitted, train, AdaptConfig(method="patchcore", bn_init="matched", batch_size=4), show_progress=False)
    with torch.no_grad():
        before = fitted.embed(_textures(4, 3))
    adapt(fitted, train, AdaptConfig(method="patchcore", bn_init="matched", batch_size=4), show_progress=False,
          bn_reference=reference)
    with torch.no_grad():
        after = fitted.embed(_textures(4, 3))
    assert torch.allclose(after, before, atol=1e-3 * float(before.abs().max()))  # the same features
    restore_bn_state(ext, source)
    cut = TensorDataset(0.5 + 0.1 * (_textures(4, 3) - 0.5))
    adapt(fitted, cut, AdaptConfig(method="patchcore", bn_init="matched", batch_size=4), show_progress=False,
          bn_reference=reference)
    assert not torch.allclose(ext.bn_modules()[0].running_var, source["0.running_var"], rtol=0.1)
    restore_bn_state(ext, source)


def test_bn_init_gated_records_its_choice_and_needs_the_reference(fitted):
    """``bn_init="gated"`` on the bundled MobileNetV2: on a contrast-cut split the matched statistics bring the
    patches nearer the bank, so the gate keeps them, and the history says so (``attrs``) with both distances,
    for the statistics alone and before alignment steps alike."""
    ext = fitted.extractor
    source = bn_state(ext)
    train = TensorDataset(_textures(6, 0))
    reference = bn_stats.bn_input_moments(fitted, torch.utils.data.DataLoader(train, batch_size=6))
    cut = TensorDataset(0.5 + 0.1 * (_textures(4, 3) - 0.5))
    with pytest.raises(AdaptationError, match="bn_init='gated' needs .* bn_reference"):
        adapt(fitted, cut, AdaptConfig(method="patchcore", bn_init="gated", batch_size=4), show_progress=False)
    alone = adapt(fitted, cut, AdaptConfig(method="patchcore", bn_init="gated", batch_size=4), show_progress=False,
                  bn_reference=reference)
    assert len(alone) == 0 and alone.attrs["bn_start"] == "matched"
    assert alone.attrs["nn_matched"] < alone.attrs["nn_source"]
    assert not torch.equal(ext.bn_modules()[0].running_var, source["0.running_var"])
    restore_bn_state(ext, source)
    hist = adapt(fitted, cut, AdaptConfig(method="roda", bn_init="gated", batch_size=4, steps=1), show_progress=False,
                 bn_reference=reference)
    assert len(hist) == 1 and hist.attrs == alone.attrs
    restore_bn_state(ext, source)
    plain = adapt(fitted, cut, AdaptConfig(method="roda", batch_size=4, steps=1), show_progress=False)
    assert plain.attrs == {"bn_start": "source"}
    restore_bn_state(ext, source)


def test_a_runaway_cost_scale_stops_adaptation_as_diverged(fitted, monkeypatch):
    # the encoder "ran away": the plan's cost scale is inf. adapt reports a divergence (a result the runners
    # record as NaN), not the Sinkhorn eps error of bad input, and leaves the BatchNorm state restorable
    from lib.roda import alignment

    source = bn_state(fitted.extractor)
    monkeypatch.setattr(alignment, "cost_scale", lambda C, mode="mean": torch.full((1, 1), float("inf")))
    data = TensorDataset(_textures(3, 16))
    try:
        with pytest.raises(adaptation.AdaptationDiverged, match="cost scale .* inf.*diverged"):
            adapt(fitted, data, AdaptConfig(epochs=1, batch_size=3), show_progress=False)
    finally:
        restore_bn_state(fitted.extractor, source)


def test_the_full_profiles_wide_resnet50_path_runs_without_its_weights(tmp_path):
    """The `full` profile (the paper's WRN-50-2, layer2 + layer3) end to end without the ImageNet file: its
    backbone with seeded random weights, its PatchCore settings and its RoDA configuration adapt only BatchNorm
    affine parameters with a finite loss, and the source state restores exactly; a user with the weights (and a
    GPU) runs the same path with ``backbone_weights="IMAGENET1K_V1"``."""
    from lib.experiments import profiles
    from lib.experiments.roda_grid import config_from_profile

    cfg = profiles.resolve("full", device="cpu", out_dir=tmp_path, backbone_weights="random")
    assert cfg.backbone == "wide_resnet50_2"
    ext = load_backbone(cfg.backbone, weights=cfg.backbone_weights, device="cpu")
    assert ext.strides == [8, 16] and ext.channels == [512, 1024]
    pc = cfg["patchcore"]
    model = PatchCore(ext, coreset_ratio=pc["coreset_ratio"], max_bank=pc["max_bank"], device="cpu")
    model.fit([dict(image=_textures(2, 0))])
    conf = config_from_profile(cfg, "roda", epochs=1, batch_size=2)
    assert conf.epochs == 1 and conf.method == "roda"
    before, source = _snapshot(ext.model), bn_state(ext)
    hist = adapt(model, TensorDataset(_textures(2, 1) * 0.6), conf, show_progress=False)
    assert len(hist) and torch.isfinite(torch.tensor(hist.loss.values)).all()
    after = _snapshot(ext.model)
    bn_affine = {n for n, p in ext.model.named_parameters() if any(p is q for q in ext.bn_affine_parameters())}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= bn_affine
    restore_bn_state(ext, source)
    restored = _snapshot(ext.model)
    assert all(torch.equal(v, restored[k]) for k, v in before.items())
