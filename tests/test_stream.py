"""Streaming adaptation: prequential scores, the label-free guard, and the source state on reset."""

import pytest
import torch

from lib.common.backbones import load_backbone
from lib.roda.adaptation import bn_state
from lib.roda.online import GuardConfig, OnlineAdapter, StreamAdapter, StreamConfig, StreamError, one_shot_adapt
from lib.roda.patchcore import PatchCore


def _textures(n, seed, size=64, shift=0.0):
    """Stripe textures (the normals); ``shift`` darkens them (a global, gradual distribution shift)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0, 1, size)
    stripes = 0.5 + 0.25 * torch.sin(12 * (base[None, :] + base[:, None]))
    return (stripes[None, None] - shift + 0.03 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def _anomalous(n, seed, size=64):
    """Images that are defect everywhere: coarse random blobs, nothing like the stripes."""
    g = torch.Generator().manual_seed(seed)
    blobs = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(blobs, size=(size, size), mode="nearest")


@pytest.fixture(scope="module")
def model():
    ext = load_backbone("mobilenet_v2")
    return PatchCore(ext, coreset_ratio=0.25, device="cpu").fit([dict(image=_textures(6, 0))])


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _config(**guard):
    guard.setdefault("hold_ratio", 2.0)
    return StreamConfig(method="roda", lr=0.003, augment="none", loss=dict(eps=0.1), guard=GuardConfig(**guard))


def test_scores_are_prequential_and_reset_restores_source(model):
    source = bn_state(model.extractor)
    stream = StreamAdapter(model, _config())
    try:
        for t in range(3):
            images = _textures(4, 10 + t, shift=0.01 * t)
            expected = model.patch_scores(images).flatten(1).max(1).values.numpy()
            out = stream.process(images)
            torch.testing.assert_close(torch.as_tensor(out["scores"]), torch.as_tensor(expected))
        assert [r["action"] for r in stream.log] == ["warmup", "adapt", "adapt"]
        assert not _same(bn_state(model.extractor), source)  # it adapted
        stream.reset()
        assert _same(bn_state(model.extractor), source)
        assert stream.distance_ref is None  # references restart after a reset
    finally:
        stream.reset()


def test_guard_holds_an_all_anomalous_batch_and_resets_after_patience(model):
    source = bn_state(model.extractor)
    stream = StreamAdapter(model, _config(patience=2))
    try:
        stream.process(_textures(4, 1))
        stream.process(_textures(4, 2))
        before = bn_state(model.extractor)
        out = stream.process(_anomalous(4, 3))
        assert out["row"]["action"] == "hold"
        assert out["row"]["distance"] > stream.config.guard.hold_ratio * out["row"]["distance_ref"]
        assert _same(bn_state(model.extractor), before)  # no update on the anomalous batch
        assert stream.process(_textures(4, 4))["row"]["action"] == "adapt"  # normal again: adapts
        stream.process(_anomalous(4, 5))
        assert stream.process(_anomalous(4, 6))["row"]["action"] == "reset"  # persistent: back to source
        assert _same(bn_state(model.extractor), source)
        assert stream.process(_anomalous(4, 7))["row"]["action"] == "warmup"  # new regime, new reference
    finally:
        stream.reset()


def test_guard_follows_a_gradual_ramp(model):
    stream = StreamAdapter(model, _config())
    try:
        actions = [stream.process(_textures(4, 20 + t, shift=0.01 * t))["row"]["action"] for t in range(5)]
        assert actions == ["warmup"] + ["adapt"] * 4
    finally:
        stream.reset()


def test_collapse_and_disabled_guard(model):
    stream = StreamAdapter(model, _config(collapse_ratio=0.5))
    stream.n_reference, stream.distance_ref, stream.spread_ref = 3, 1.0, 0.8
    assert stream.decide(dict(distance=1.0, spread=0.3)) == "reset"  # features collapsed onto few entries
    assert stream.decide(dict(distance=1.0, spread=0.7)) == "adapt"
    assert stream.decide(dict(distance=2.5, spread=0.7)) == "hold"
    assert stream.decide(dict(distance=2.5, spread=0.1)) == "hold"  # far away: a burst, not a collapse
    off = StreamAdapter(model, _config(enabled=False))
    off.n_reference, off.distance_ref, off.spread_ref = 3, 1.0, 0.8
    assert off.decide(dict(distance=9.0, spread=0.0)) == "adapt"


def test_any_alignment_method_runs_and_bad_settings_fail(model):
    source = bn_state(model.extractor)
    for method in ("ttt++", "ttac", "continuous_ot"):
        adapter = OnlineAdapter(model, method, lr=0.01)
        assert adapter.step(_textures(2, 30))["finite"]
    from lib.roda.adaptation import restore_bn_state

    restore_bn_state(model.extractor, source)
    rows = one_shot_adapt(model, [_textures(2, 31)], StreamConfig(method="ttt++", lr=0.01), epochs=2)
    assert len(rows) == 2
    restore_bn_state(model.extractor, source)
    with pytest.raises(StreamError, match="choose one of"):
        OnlineAdapter(model, "nope")
    with pytest.raises(StreamError, match="takes no option"):
        OnlineAdapter(model, "roda", loss=dict(epsilon=1))
    with pytest.raises(StreamError, match="hold_ratio"):
        GuardConfig(hold_ratio=0.9)


def test_source_check_goes_back_to_source_when_it_fits_better(model):
    source = bn_state(model.extractor)
    # a large step on normal images pushes the features away from the bank: the source fits better
    guard = GuardConfig(hold_ratio=100.0, source_check=2)
    config = StreamConfig(method="roda", lr=0.05, loss=dict(eps=0.1), guard=guard)
    stream = StreamAdapter(model, config)
    try:
        rows = [stream.process(_textures(4, 40 + t))["row"] for t in range(3)]
        assert [r["action"] for r in rows] == ["warmup", "adapt", "source"]
        assert _same(bn_state(model.extractor), source)
        assert stream.distance_ref < rows[2]["distance"]  # re-referenced on the source state's signals
    finally:
        stream.reset()


def test_the_robust_options_are_fixed_on_the_first_batch_and_again_after_a_restart(model):
    """eps='auto', the semi-relaxed plan and coverage weights resolve from the batch itself (no labels): the
    same batch gives the same eps, another batch another, and restart() resolves afresh."""
    from lib.experiments.profiles import ROBUST_RODA
    from lib.roda.adaptation import restore_bn_state

    source = bn_state(model.extractor)
    weights = torch.ones(model.bank.shape[0])
    with pytest.raises(StreamError, match="coverage counts"):
        OnlineAdapter(model, "roda", loss=ROBUST_RODA["loss"])
    adapter = OnlineAdapter(model, "roda", loss=ROBUST_RODA["loss"], lr=0.0, augment="none", bank_weights=weights)
    first = adapter.step(_textures(2, 40))
    again = adapter.step(_textures(2, 41))  # fixed on the first batch: the same eps for the next one
    assert first["finite"] and first["eps_cost"] > 0 and "rho_cost" in first
    assert again["eps_cost"] == first["eps_cost"]
    adapter.restart()
    other = adapter.step(_textures(2, 41))
    assert other["eps_cost"] != first["eps_cost"]
    restore_bn_state(model.extractor, source)
