"""Cached backbone maps for the open-set methods, and the seeded augmentation pool they train on.

The backbone is frozen, so each image's deep-tap map is computed once (:class:`MapCache`). DRA augments every
training image afresh at every step (``RandomRotation(180)``; CutMix pseudo anomalies with ``ColorJitter``);
with cached maps a fresh draw per step would mean a backbone pass per step. Instead every training normal gets
a *pool* of augmented variants, each seeded by ``(kind, image, variant)`` only, so all runs share it:

- ``kind="rotate"``: the normal rotated by an angle U(-``max_angle``, ``max_angle``) (DRA: 180 degrees);
- ``kind="cutmix"``: a CutMix pseudo anomaly (patch area U(0.02, 0.15), log-uniform aspect in [0.3, 1/0.3],
  brightness/contrast/saturation jitter +-0.1) of the normal, then rotated like the above.

The training sampler (:mod:`lib.dpdl.engine`) draws a fresh variant of the pool at every step from a
generator seeded by the run seed, so runs stay deterministic and the pool is the only approximation of
"fresh augmentation per step" (its size is ``pseudo_variants`` / ``rotation_variants`` in the profile).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.transforms.functional as TF

from lib.common.data import AnomalyDataset
from lib.common.utils import progress, stable_hash, torch_save

__all__ = ["AUGMENTATION_POOL", "MapCache", "NormalizedInput", "augment_image", "cutmix_pseudo_anomaly",
           "random_rotation"]

AUGMENTATION_POOL = ("cutmix", "rotate")


def cutmix_pseudo_anomaly(image: torch.Tensor, generator: torch.Generator, area=(0.02, 0.15),
                          aspect=(0.3, 1 / 0.3), jitter: float = 0.1) -> torch.Tensor:
    """DRA's CutMix pseudo anomaly on one image (3, H, W) in [0, 1]: cut a patch of area ratio U(area) and
    log-uniform aspect ratio, jitter its brightness, contrast and saturation by +-``jitter`` (DRA's
    ColorJitter(0.1, 0.1, 0.1, 0.1); hue is left out), paste it at another random location of the same image."""

    def u(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    _, h, w = image.shape
    ratio = u(*area) * h * w
    ar = math.exp(u(math.log(aspect[0]), math.log(aspect[1])))
    ph = int(min(h - 1, max(1, round(math.sqrt(ratio * ar)))))
    pw = int(min(w - 1, max(1, round(math.sqrt(ratio / ar)))))
    y0, x0 = int(u(0, h - ph)), int(u(0, w - pw))
    y1, x1 = int(u(0, h - ph)), int(u(0, w - pw))
    patch = image[:, y0:y0 + ph, x0:x0 + pw].clone()
    patch = patch * u(1 - jitter, 1 + jitter)
    mean = patch.mean()
    patch = (patch - mean) * u(1 - jitter, 1 + jitter) + mean
    gray = patch.mean(0, keepdim=True)
    patch = (patch - gray) * u(1 - jitter, 1 + jitter) + gray
    out = image.clone()
    out[:, y1:y1 + ph, x1:x1 + pw] = patch.clamp(0, 1)
    return out


def random_rotation(image: torch.Tensor, generator: torch.Generator, max_angle: float = 180.0) -> torch.Tensor:
    """Rotate (3, H, W) by U(-max_angle, max_angle) degrees about the centre, corners filled black (DRA)."""
    angle = (2 * float(torch.rand((), generator=generator)) - 1) * max_angle
    return TF.rotate(image, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)


def augment_image(image: torch.Tensor, kind: str, generator: torch.Generator, max_angle: float = 180.0):
    """One pool variant: ``"rotate"`` (rotation) or ``"cutmix"`` (CutMix pseudo anomaly, then rotation)."""
    if kind not in AUGMENTATION_POOL:
        raise ValueError(f"augmentation kind must be one of {AUGMENTATION_POOL}, got {kind!r}")
    if kind == "cutmix":
        image = cutmix_pseudo_anomaly(image, generator)
    return random_rotation(image, generator, max_angle) if max_angle > 0 else image


class NormalizedInput(torch.nn.Module):
    """A stand-in extractor whose one "map" is the normalised image itself, for end-to-end fine-tuning: a
    :class:`MapCache` over it caches the (augmented) inputs, and the network up to the deep tap
    (:func:`lib.common.backbones.input_to_tap`) becomes the trainable tail of :class:`lib.dpdl.engine.Trunk`."""

    def __init__(self, extractor):
        super().__init__()
        self.extractor = extractor
        self.normalization = dict(extractor.normalization, layers=["input"])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.extractor.normalize(images.to(self.extractor.mean.device)).contiguous()]


class MapCache:
    """Backbone maps at one tap for samples, computed once and kept (float16 by default) across runs.

    ``extractor`` is any module returning a list of maps (a :class:`lib.common.backbones.FeatureExtractor` or a test
    stand-in); ``tap`` indexes that list (-1: the last, the deep tap). ``resize``/``crop`` are the
    :class:`lib.common.data.AnomalyDataset` geometry. Augmented maps (``kind``, ``variant``) are of images seeded by
    ``(kind, last path parts, box, variant)`` only, so every run and every machine shares them.
    ``max_angle``: rotation range of the pool (degrees; 0 = no rotation).
    """

    def __init__(self, extractor: Callable, resize=224, crop=None, tap: int = -1, batch_size: int = 16,
                 dtype=torch.float16, device="cpu", show_progress: bool = False, path=None, max_angle: float = 180.0):
        self.extractor, self.resize, self.crop, self.tap = extractor, resize, crop, tap
        self.batch_size, self.dtype, self.device = batch_size, dtype, torch.device(device)
        self.show_progress = show_progress
        self.max_angle = float(max_angle)
        self._maps: dict = {}
        self.seconds = 0.0
        self.path = path
        if path is not None and Path(path).is_file():
            stored = torch.load(path, map_location="cpu", weights_only=False)
            if stored.get("identity") == self.identity():
                self._maps = stored["maps"]

    def identity(self) -> dict:
        """What the maps depend on (checked when a saved cache is loaded): backbone, geometry, tap, pool."""
        norm = getattr(self.extractor, "normalization", None)
        return dict(extractor=str(norm if norm is not None else type(self.extractor).__name__),
                    resize=str(self.resize), crop=str(self.crop), tap=self.tap, dtype=str(self.dtype),
                    augment="v2", max_angle=self.max_angle)

    def save(self, path=None):
        """Write the maps (atomically) to ``path`` (default: the ``path`` given at construction)."""
        path = path or self.path
        if path is None:
            raise ValueError("MapCache.save needs a path")
        return torch_save(dict(identity=self.identity(), maps=self._maps), path)

    def __len__(self) -> int:
        return len(self._maps)

    @staticmethod
    def key(sample, variant: int | None = None, kind: str = "cutmix"):
        return (sample.path, tuple(sample.box) if sample.box else None, None if variant is None else (kind, variant))

    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        size = tuple(images.shape[-2:])
        try:
            with torch.no_grad():
                maps = self.extractor(images.to(self.device))[self.tap]
        except RuntimeError as err:
            raise ValueError(f"the backbone cannot take {size[0]}x{size[1]} px images ({err}): raise the image "
                             "size (profile key dpdl.image_size; at least 32 px for a stride-32 backbone)") from err
        if maps.ndim != 4 or maps.shape[-1] < 1 or maps.shape[-2] < 1:
            raise ValueError(f"{size[0]}x{size[1]} px images give backbone maps of shape {tuple(maps.shape)}: "
                             "raise the image size (profile key dpdl.image_size)")
        return maps

    def _compute(self, samples, variant: int | None, kind: str):
        if not samples:
            return
        start = time.perf_counter()
        dataset = AnomalyDataset(samples, resize=self.resize, crop=self.crop)
        batches = range(0, len(samples), self.batch_size)
        if self.show_progress:
            batches = progress(batches, desc="backbone maps" + (f" ({kind})" if variant is not None else ""))
        for lo in batches:
            idx = range(lo, min(lo + self.batch_size, len(samples)))
            images = []
            for i in idx:
                img = dataset[i]["image"]
                if variant is not None:
                    s = samples[i]
                    # keyed by the last path parts, not the absolute path: the same variants everywhere
                    key = "/".join(Path(s.path).parts[-3:])
                    seed = stable_hash("cutmix", key, s.box, variant) if kind == "cutmix" else \
                        stable_hash(kind, key, s.box, variant)
                    img = augment_image(img, kind, torch.Generator().manual_seed(seed), self.max_angle)
                images.append(img)
            maps = self._extract(torch.stack(images))
            for i, m in zip(idx, maps):
                self._maps[self.key(samples[i], variant, kind)] = m.detach().to("cpu", self.dtype)
        self.seconds += time.perf_counter() - start

    def maps(self, samples, variant: int | None = None, kind: str = "cutmix") -> torch.Tensor:
        """Stacked maps (N, C, h, w) of ``samples`` (computing the missing ones); ``variant`` None = as is."""
        samples = list(samples)
        if not samples:
            raise ValueError("no samples to stack")
        missing, seen = [], set()
        for s in samples:
            k = self.key(s, variant, kind)
            if k not in self._maps and k not in seen:
                missing.append(s)
                seen.add(k)
        self._compute(missing, variant, kind)
        return torch.stack([self._maps[self.key(s, variant, kind)] for s in samples])

    def pseudo_maps(self, samples, variants: int = 1) -> torch.Tensor:
        """Maps of ``variants`` CutMix pseudo anomalies per sample (N * variants, C, h, w)."""
        return torch.cat([self.maps(samples, variant=v, kind="cutmix") for v in range(variants)])

    def rotated_maps(self, samples, variants: int = 1) -> torch.Tensor:
        """Maps of ``variants`` rotated copies per sample (N * variants, C, h, w)."""
        return torch.cat([self.maps(samples, variant=v, kind="rotate") for v in range(variants)])
