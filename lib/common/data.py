"""Datasets: MVTec AD layout, labelled folders (``labels.csv``), preprocessing and splits (ELPV:
:mod:`lib.common.elpv`).

Every loader returns a list of :class:`Sample` sorted by path, so that any seeded shuffle done later
depends on the seed alone, never on the order in which the file system lists a directory.

Preprocessing follows the official PatchCore (``Resize(256)`` on the shorter side, ``CenterCrop(224)``),
with one documented insertion, the distribution shift of RoDA, at one of two stages (``corruption.stage``;
:mod:`lib.common.corruptions` explains both)::

    native:  load -> RGB -> [upsample to the native size] -> corrupt -> resize (shorter side 256) -> crop 224
    working: load -> RGB -> resize (shorter side 256, bilinear) -> corrupt (uint8 HxWx3) -> center crop 224

Masks take the same geometry with nearest-neighbour resizing and are never corrupted. Images smaller
than 32 px on a side are refused (imagecorruptions and the stride-16 taps need that much).
"""

from __future__ import annotations

import csv
import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lib.common import registry
from lib.common.registry import MIN_SIDE
from lib.common.utils import REPO_ROOT

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # validation data beside the checkout (not shipped)


class DataError(ValueError):
    """Bad or missing data; the message names the fix."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    ``label`` is 0 (normal) or 1 (anomalous); ``defect`` the anomaly class (``"good"`` for normals);
    ``mask`` an optional path to a 0/255 ground-truth mask; ``box`` an optional
    (left, top, right, bottom) crop applied at load time (KolektorSDD thirds).
    """

    path: str
    label: int
    defect: str = "good"
    mask: str | None = None
    box: tuple[int, int, int, int] | None = None


# ----------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _require_root(root, what: str) -> Path:
    if root is None:
        raise DataError(f"no data root given for {what}: pass data_root=... (a folder on disk)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist: pass data_root= the folder that holds {what} "
                        "(MVTec AD users without a copy: lib.common.download.download_mvtec(root))")
    return root


def mvtec_categories(root) -> list[str]:
    """Categories under an MVTec AD root (folders that have ``train/good``), and under its ``mvtec/`` folder."""
    root = _require_root(root, "the MVTec AD categories")
    found = {p.name for top in (root, root / "mvtec") if top.is_dir() for p in top.iterdir()
             if (p / "train" / "good").is_dir()}
    return sorted(found)


def mvtec_samples(root, category: str, split: str) -> list[Sample]:
    """Samples of one MVTec AD category.

    Layout: ``CATEGORY/train/good/*.png``, ``CATEGORY/test/<defect>/*.png``,
    ``CATEGORY/ground_truth/<defect>/<stem>_mask.png``.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    root = _require_root(root, "the MVTec AD categories")
    folder = root / category
    if not folder.is_dir():
        found = mvtec_categories(root)
        close = difflib.get_close_matches(category, found, n=1)
        raise DataError(
            f"category {category!r} not found under {root}: expected {folder}. "
            + (f"Did you mean {close[0]!r}? " if close else "")
            + f"Categories there: {found or 'none (is data_root the folder that holds the category folders?)'}"
        )
    split_dir = folder / split
    if not split_dir.is_dir() or (split == "train" and not (split_dir / "good").is_dir()):
        raise DataError(f"wrong layout under {folder}: expected {folder}/train/good and {folder}/test/<defect> "
                        "(the MVTec AD layout; see docs/settings.md 'Data')")
    samples = []
    for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for img in _images_in(defect_dir):
            if defect == "good":
                samples.append(Sample(str(img), 0, "good"))
                continue
            mask = folder / "ground_truth" / defect / f"{img.stem}_mask.png"
            samples.append(Sample(str(img), 1, defect, str(mask) if mask.exists() else None))
    if not samples:
        raise DataError(f"category {category!r} has no images in {split_dir}: check the copy is complete")
    if split == "train" and any(s.label for s in samples):
        raise DataError(f"{split_dir} holds anomalous folders: the train split must contain train/good only")
    return samples


def is_labelled_folder(path) -> bool:
    """A labelled folder is recognised by its ``labels.csv``, whatever the folder is called."""
    path = Path(path)
    return path.is_dir() and (path / "labels.csv").is_file()


def labelled_folder_samples(root) -> list[Sample]:
    """Samples of a folder with ``labels.csv`` (columns ``image,label,defect,mask``; paths relative).

    Used for HeadCT, BrainMRI and KolektorSDD (as prepared in ``../shared/data``) and any user folder
    in the same format. Every row is checked: ``label`` must be 0 (normal) or 1 (anomalous) and ``image``
    non-empty; errors name the line of ``labels.csv`` (the header is line 1).
    """
    root = _require_root(root, "a labelled image folder")
    table = root / "labels.csv"
    if not table.is_file():
        raise DataError(f"wrong layout: {root} has no labels.csv (columns image,label,defect,mask; "
                        "see docs/settings.md 'Data')")
    samples, missing, bad = [], [], []
    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"image", "label"} <= set(reader.fieldnames or []):
            raise DataError(f"{table} must have the columns image,label,defect,mask; found {reader.fieldnames}")
        for row in reader:
            line = reader.line_num
            raw_label, image = (row.get("label") or "").strip(), (row.get("image") or "").strip()
            if raw_label not in ("0", "1"):
                bad.append(f"line {line}: label must be 0 (normal) or 1 (anomalous), got {raw_label!r}")
                continue
            if not image:
                bad.append(f"line {line}: the image column is empty")
                continue
            img = root / image
            mask = root / row["mask"].strip() if (row.get("mask") or "").strip() else None
            for p in (img, mask):
                if p is not None and not p.is_file():
                    missing.append(f"line {line}: {p.relative_to(root) if p.is_relative_to(root) else p}")
            label = int(raw_label)
            defect = (row.get("defect") or "").strip() or ("good" if label == 0 else "anomaly")
            samples.append(Sample(str(img), label, defect, str(mask) if mask else None))
    if bad:
        raise DataError(f"{len(bad)} rows of {table} are invalid: " + "; ".join(bad[:5])
                        + ("; ..." if len(bad) > 5 else "") + ". Fix those rows (columns image,label,defect,mask)")
    if missing:
        raise DataError(f"{len(missing)} rows of {table} point at missing files, e.g. {missing[:3]}: "
                        "fix the paths (relative to the folder) or remove those rows")
    if not samples:
        raise DataError(f"{table} lists no images")
    return sorted(samples, key=lambda s: (s.path, s.box or ()))


# ----------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (first, second) with ``fraction`` of each label in ``first``.

    Deterministic for a given ``labels`` and ``seed``; both index arrays come back sorted. Each label
    keeps at least one element on each side when it has two or more.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        raise DataError("cannot split an empty set: the target split has no images")
    if not 0 < fraction < 1:
        raise DataError(f"fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    first = []
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        first.extend(idx[:k].tolist())
    first = np.sort(np.asarray(first, dtype=int))
    second = np.setdiff1d(np.arange(len(labels)), first)
    return first, second


def subsample(samples: Sequence[Sample], n: int | None, seed: int) -> list[Sample]:
    """At most ``n`` samples, stratified by label, deterministic in ``seed``; order kept."""
    samples = list(samples)
    if n is None or n >= len(samples):
        return samples
    keep, _ = stratified_split([s.label for s in samples], n / len(samples), seed)
    return [samples[i] for i in keep]


def split_normals(samples: Sequence[Sample], train_fraction: float = 0.75, seed: int = 42):
    """Datasets without a train/test split (DRA protocol): ``train_fraction`` of the normals train the
    model; the other normals and every anomaly form the test set. Returns (train, test)."""
    samples = list(samples)
    normal = [s for s in samples if s.label == 0]
    if not normal:
        raise DataError("the dataset has no normal images to train on")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(normal))
    # the test share is rounded up, as scikit-learn's train_test_split does in DRA (BrainMRI: 73 / 25)
    n_train = len(normal) - math.ceil(round((1 - train_fraction) * len(normal), 6))
    train = sorted((normal[i] for i in order[:n_train]), key=lambda s: s.path)
    train_set = set(train)
    test = [s for s in samples if s not in train_set]
    return train, test


# ----------------------------------------------------------------------------------------------------
# Tasks: (name, data root) -> train / test samples and their geometry
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """A dataset as PatchCore/RoDA use it: normal training images and a labelled test set."""

    name: str
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    resize: int | tuple[int, int] = 256
    crop: int | tuple[int, int] | None = 224
    native: tuple | None = None  # the originals' (h, w): registry TaskSpec.native
    stage: str = "working"  # where the shift is applied (lib.common.corruptions.STAGES)

    @property
    def has_masks(self) -> bool:
        return any(s.mask for s in self.test if s.label == 1)

    def geometry(self) -> dict:
        return dict(resize=self.resize, crop=self.crop)


def _geometry(name: str) -> dict:
    """resize / crop (and native size) of a task: the registry's (``registry.TASKS``); a user's folder: PatchCore's
    256 / 224, its files native."""
    spec = registry.TASKS.get(name)
    return dict(spec.geometry, native=spec.native) if spec else dict(registry.SQUARE)


def load_task(name: str, data_root=None, normal_split_seed: int = 42) -> Task:
    """Resolve a task name into train/test samples.

    ``name`` is ``"elpv"`` (embedded default, needs no data root), ``"mvtec/<category>"`` (``data_root``
    holds the category folders), ``"synthetic"`` (generated MVTec layout under ``data_root``), or the
    name of a labelled folder (``"ksdd"``, ``"headct"``, ``"brainmri"`` or any folder under
    ``data_root`` with ``labels.csv``; its normals are split 75/25 with ``normal_split_seed``).
    """
    if name == "elpv":
        from lib.common.elpv import elpv_samples  # (elpv.py reads Sample from here)

        train, test = split_normals(elpv_samples(), 0.75, normal_split_seed)
        return Task(name, tuple(train), tuple(test), **_geometry("elpv"))
    if name.startswith("mvtec/") or name == "synthetic":
        category = name.split("/", 1)[1] if "/" in name else "synthetic"
        if name == "synthetic":
            from lib.common.synthetic import make_synthetic_mvtec

            data_root = Path(data_root) if data_root else REPO_ROOT / "cache" / "data"
            make_synthetic_mvtec(data_root, category)
        train = mvtec_samples(data_root, category, "train")
        test = mvtec_samples(data_root, category, "test")
        return Task(name, tuple(train), tuple(test), **_geometry(name))
    if is_labelled_folder(Path(name).expanduser()):  # a labelled folder given by its path
        folder = Path(name).expanduser()
    else:
        root = _require_root(data_root, f"the labelled folder {name!r}")
        folder = root / name if is_labelled_folder(root / name) else root
    samples = labelled_folder_samples(folder)
    train, test = split_normals(samples, 0.75, normal_split_seed)
    return Task(name, tuple(train), tuple(test), **_geometry(name))


# ----------------------------------------------------------------------------------------------------
# Images and the torch dataset
# ----------------------------------------------------------------------------------------------------


class ImageReadError(DataError):
    """An image or mask file that cannot be decoded; the message names the file."""


def _decode(path) -> Image.Image:
    """Open and fully decode ``path``, upright (EXIF orientation applied); any failure -> ImageReadError."""
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)  # always a new, loaded image (a copy when upright)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist: check the data root") from None
    except Exception as exc:  # noqa: BLE001 - truncated, not an image, decompression bomb, bad EXIF ...
        raise ImageReadError(f"cannot read image {path} ({type(exc).__name__}: {exc}): the file is damaged or "
                             "not an image; replace it or remove it from the data set") from None


def _to_8bit(image: Image.Image, path) -> Image.Image:
    """16-bit and 32-bit grey images to 8-bit ``L`` by their bit depth (0..65535 -> 0..255), never by
    clipping (PIL's own conversion turns a 16-bit image into a white one)."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return image
    array = np.asarray(image, dtype=np.float64)
    if array.size and not np.isfinite(array).all():
        raise ImageReadError(f"image {path} holds NaN or infinite pixels: replace it")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if low < 0 or high > 65535:
        raise ImageReadError(f"image {path} ({image.mode}) has values in [{low:g}, {high:g}], outside 0..65535: "
                             "convert it to 8- or 16-bit")
    floats = image.mode == "F"  # float images in [0, 1] or [0, 255] keep their scale
    scale = 255.0 if floats and high <= 1 else 1.0 if floats and high <= 255 else 255.0 / 65535.0
    return Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8), mode="L")


def load_image(path, box=None) -> Image.Image:
    """Open an image as 8-bit RGB; refuse images under 32 px.

    Handles 8- and 16-bit grey (16-bit scaled by its bit depth), RGB, palette, grey+alpha and RGBA
    (transparent pixels over black), and EXIF orientation (the image as a viewer shows it). Every decode
    failure is one :class:`ImageReadError` that names the file."""
    image = _to_8bit(_decode(path), path)
    if box is not None:
        image = image.crop(box)
    if min(image.size) < MIN_SIDE:
        raise DataError(f"image {path} is {image.size[0]}x{image.size[1]} px; at least {MIN_SIDE} px per side is "
                        "needed: use larger images (or upsample them before use)")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))  # transparent pixels over black
        return Image.alpha_composite(black, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_mask(path, box=None) -> Image.Image:
    """A ground-truth mask as 8-bit ``L`` (16-bit masks scaled like images), EXIF orientation applied."""
    mask = _to_8bit(_decode(path), path).convert("L")
    return mask.crop(box) if box is not None else mask


def resize_size(size_wh, resize) -> tuple[int, int]:
    """(w, h) after a shorter-side (int) or explicit (h, w) resize."""
    w, h = size_wh
    if isinstance(resize, int):
        if w <= h:
            return resize, max(1, int(round(h * resize / w)))
        return max(1, int(round(w * resize / h))), resize
    return int(resize[1]), int(resize[0])


def center_crop(array: np.ndarray, crop) -> np.ndarray:
    if crop is None:
        return array
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    h, w = array.shape[:2]
    if ch > h or cw > w:
        raise DataError(f"crop {ch}x{cw} is larger than the resized image {h}x{w}: lower the crop or raise the resize "
                        "(--crop / --resize on the command line, geometry in a profile)")
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return array[top : top + ch, left : left + cw]


def preprocess(sample: Sample, resize=256, crop=224, corruption: Callable | None = None, stage: str = "working"):
    """Image (H, W, 3) uint8 and mask (H, W) float32 in {0, 1} after the documented pipeline.

    ``corruption`` is a callable ``uint8 HxWx3 -> uint8 HxWx3``, applied between resize and crop (``stage``
    ``"working"``), or ``(image at its stored size, (w, h) after the resize) -> uint8 HxWx3`` (``"native"``).
    """
    image = load_image(sample.path, sample.box)
    size = resize_size(image.size, resize)
    if corruption is not None and stage == "native":
        image = np.asarray(corruption(image, size), dtype=np.uint8)
    else:
        image = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.uint8)
    if corruption is not None and stage != "native":
        image = np.asarray(corruption(image), dtype=np.uint8)
        if image.shape[:2] != (size[1], size[0]):
            raise DataError(f"corruption changed the image size to {image.shape[:2]}")
    if sample.mask:
        mask = np.asarray(load_mask(sample.mask, sample.box).resize(size, Image.NEAREST)) > 127
    else:
        mask = np.zeros((size[1], size[0]), dtype=bool)
    return center_crop(image, crop), center_crop(mask, crop).astype(np.float32)


class AnomalyDataset(torch.utils.data.Dataset):
    """Samples -> dict(image (3,H,W) float [0,1], mask (1,H,W), label, defect, path, index).

    With ``corruption`` (a name from :mod:`lib.common.corruptions`) and ``severity`` > 0 every image is shifted,
    seeded per image by ``(path, corruption, severity, seed)`` so the same seed always gives the same pixels.
    ``stage`` (``"native"`` / ``"working"``) and ``native`` (the originals' size): where the shift is applied.
    With ``cache`` (a :class:`lib.common.cache.ImageCache`) each preprocessed image is kept under a key of its file
    (path, size, mtime), geometry, corruption, severity, seed and stage, and served from there the next time.
    """

    def __init__(self, samples, resize=256, crop=224, corruption: str | None = None, severity: int = 5, seed: int = 0,
                 cache=None, stage: str = "working", native=None):
        from lib.common.corruptions import check_stage

        self.samples = list(samples)
        if not self.samples:
            raise DataError("empty dataset: no images were selected (check the category, split or caps)")
        self.resize, self.crop = resize, crop
        self.corruption, self.severity, self.seed = corruption, severity, seed
        self.cache, self.stage, self.native = cache, check_stage(stage), native

    def __len__(self) -> int:
        return len(self.samples)

    def _corruptor(self, sample: Sample):
        if not self.corruption or self.corruption == "clean" or self.severity == 0:
            return None
        from lib.common.corruptions import corrupt, corrupt_native, image_seed

        # keyed by the last path components (not the absolute path) so every machine draws the same pixels
        key = f"{'/'.join(Path(sample.path).parts[-3:])}|{sample.box}|{self.corruption}|{self.severity}"
        seed = image_seed(key, self.seed)
        if self.stage == "native":
            return lambda img, size: corrupt_native(img, size, self.corruption, self.severity, seed, self.native)
        return lambda img: corrupt(img, self.corruption, self.severity, seed)

    def _cache_key(self, sample: Sample) -> str:
        from lib.common.cache import content_key, file_fingerprint

        shift = [self.corruption, self.severity, self.seed, self.stage, self.native]
        return content_key(kind="image", file=file_fingerprint(sample.path), mask=file_fingerprint(sample.mask),
                           box=sample.box, resize=self.resize, crop=self.crop,
                           shift=shift if self._corruptor(sample) is not None else None)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        key = self._cache_key(sample) if self.cache is not None else None
        hit = self.cache.get(key) if key is not None else None
        if hit is not None:
            image, mask = hit
        else:
            image, mask = preprocess(sample, self.resize, self.crop, self._corruptor(sample), self.stage)
            if key is not None:
                self.cache.put(key, image, mask)
        return dict(
            image=torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0),
            mask=torch.from_numpy(np.array(mask, copy=True))[None],
            label=sample.label,
            defect=sample.defect,
            path=sample.path,
            index=index,
        )


def make_loader(dataset, batch_size: int = 16, shuffle: bool = False, seed: int = 0, drop_last: bool = False):
    """DataLoader in the main process (2-core machines gain nothing from workers), seeded shuffling."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0,
                                       generator=generator, drop_last=drop_last)
