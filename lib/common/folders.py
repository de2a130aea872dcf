"""Any folder of images as a dataset (the command-line interface's input), and its labels where they exist.

- :func:`list_images` walks a folder recursively (png, jpg, bmp, tif; hidden files and folders skipped).
- :func:`training_images` picks what ``roda fit`` reads: ``train/good`` of an MVTec AD category, else the folder.
- :func:`read_rgb` reads grey, RGB, RGBA, palette, 16-bit and float images as 8-bit RGB. 16-bit images are
  scaled by 255/65535 (not per image, so intensities stay comparable between images); float images in
  [0, 1] by 255, other float images by their own range; RGBA is composited onto black.
- :func:`scan` reads every file once and reports what cannot be used, by path and reason.
- :class:`FolderDataset` applies the bank's geometry (resize the shorter side, center crop) and yields
  ``image`` (3, H, W) in [0, 1], ``mask``, ``label`` and ``path`` like :class:`lib.common.data.AnomalyDataset`.
- :func:`labelled_items` finds labels for ``roda evaluate``: the MVTec AD layout, ``labels.csv``, or
  ``good/`` against the other sub-folders.
- :func:`write_overlays` writes ``roda score``'s maps: each image beside its anomaly map, mirroring the folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lib.common.data import (
    IMAGE_SUFFIXES,
    MIN_SIDE,
    DataError,
    center_crop,
    labelled_folder_samples,
    mvtec_samples,
    resize_size,
)
from lib.common.utils import atomic_path, progress


@dataclass(frozen=True)
class Item:
    """One image of a folder: its path, label (-1 unknown, 0 normal, 1 anomalous), defect and mask path."""

    path: str
    label: int = -1
    defect: str = ""
    mask: str | None = None


def list_images(folder, exclude=("ground_truth",)) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); folders named in ``exclude`` are skipped."""
    folder = Path(folder)
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") for part in rel) or any(part in exclude for part in rel[:-1]):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            found.append(p)
    return sorted(found)


def training_images(folder) -> tuple[list[Path], Path]:
    """The normal images ``roda fit`` builds a bank from, and the folder they come from: ``train/good`` of an MVTec
    AD category (never its test images); every image under any other folder. A folder with parts of that layout
    (``train/``, ``test/``, ``ground_truth/``) but no ``train/good`` is refused: its images are not all normal."""
    folder = Path(folder)
    good = folder / "train" / "good"
    if good.is_dir():
        return list_images(good), good
    parts = [f"{name}/" for name in ("train", "test", "ground_truth") if (folder / name).is_dir()]
    if parts:
        raise DataError(f"{folder} has {', '.join(parts)} (the MVTec AD layout) but no train/good: pass the folder "
                        f"of normal training images itself (e.g. {folder / 'train' / 'good'})")
    return list_images(folder), folder


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    a = array.astype(np.float64)
    if np.issubdtype(array.dtype, np.integer):
        top = 65535.0 if array.max(initial=0) <= 65535 else float(array.max())
        return np.clip(np.round(a * 255.0 / max(top, 1.0)), 0, 255).astype(np.uint8)
    a = np.nan_to_num(a)
    lo, hi = (0.0, 1.0) if a.min(initial=0) >= 0 and a.max(initial=0) <= 1 else (a.min(), a.max())
    return np.clip(np.round((a - lo) * 255.0 / max(hi - lo, 1e-12)), 0, 255).astype(np.uint8)


def _rgb_from_array(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first TIFF
    if array.ndim == 3 and array.shape[-1] == 4:  # RGBA onto black
        dtype = array.dtype
        top = 65535.0 if dtype == np.uint16 else 255.0 if dtype == np.uint8 else 1.0
        alpha = np.clip(array[..., 3:].astype(np.float64) / top, 0.0, 1.0)
        array = (array[..., :3] * alpha).astype(dtype)
    array = _to_uint8(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim != 3 or array.shape[-1] < 3:
        raise DataError(f"unsupported image array shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array[..., :3]), "RGB")


def read_rgb(path) -> Image.Image:
    """8-bit RGB image from any readable file (see the module docstring); :class:`DataError` otherwise."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGB", "L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV"):
                image = im.convert("RGB")
            elif im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
                rgba = im.convert("RGBA")
                image = Image.new("RGB", rgba.size, (0, 0, 0))
                image.paste(rgba, mask=rgba.split()[3])
            else:  # I;16, I;16B, I, F: through numpy, scaled to 8 bit
                image = _rgb_from_array(np.asarray(im))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except DataError:
        raise
    except Exception as pil_error:  # noqa: BLE001 - PIL fails on some TIFFs (16-bit RGB, planar): try tifffile
        if path.suffix.lower() not in (".tif", ".tiff"):
            raise DataError(f"{path} cannot be read as an image ({type(pil_error).__name__}: {pil_error})") from None
        try:
            import tifffile

            image = _rgb_from_array(tifffile.imread(path))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{path} cannot be read as an image ({type(exc).__name__}: {exc})") from None
    if min(image.size) < MIN_SIDE:
        raise DataError(f"{path} is {image.size[0]}x{image.size[1]} px; at least {MIN_SIDE} px per side is needed")
    return image


def scan(items, show_progress: bool = True) -> tuple[list, list[tuple[str, str]]]:
    """Read every item once. Returns (readable items, [(path, reason), ...] for the others)."""
    from lib.common.utils import progress

    good, bad = [], []
    for item in progress(items, desc="checking images", disable=not show_progress, leave=False):
        path = item.path if isinstance(item, Item) else str(item)
        try:
            read_rgb(path)
            good.append(item)
        except DataError as err:
            bad.append((path, str(err)))
    return good, bad


def prepare(path, resize=256, crop=224, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (H, W, 3) image and float32 (H, W) mask after resize (shorter side) and center crop."""
    image = read_rgb(path)
    size = resize_size(image.size, resize)
    image = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.uint8)
    if mask:
        with Image.open(mask) as m:
            target = np.asarray(m.convert("L").resize(size, Image.NEAREST)) > 127
    else:
        target = np.zeros(image.shape[:2], dtype=bool)
    return center_crop(image, crop), center_crop(target, crop).astype(np.float32)


class FolderDataset(torch.utils.data.Dataset):
    """``items`` (paths or :class:`Item`) -> dict(image, mask, label, path, index) in the bank's geometry."""

    def __init__(self, items, resize=256, crop=224):
        self.items = [i if isinstance(i, Item) else Item(str(i)) for i in items]
        if not self.items:
            raise DataError("no images to read")
        self.resize, self.crop = resize, crop

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        image, mask = prepare(item.path, self.resize, self.crop, item.mask)
        return dict(image=torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255.0),
                    mask=torch.from_numpy(mask)[None], label=item.label, path=item.path, index=index)


def labelled_items(folder) -> tuple[list[Item], str]:
    """Labelled images of ``folder`` and the layout found (for ``roda evaluate``).

    In order: an MVTec AD category (``test/<defect>``, masks in ``ground_truth/<defect>/<stem>_mask.png``),
    or an MVTec test folder whose parent has ``ground_truth``; a ``labels.csv`` (``image,label,defect,mask``);
    ``good/`` (normal) beside other sub-folders (anomalous, the folder name is the defect), recursively.
    """
    folder = Path(folder)
    if (folder / "test").is_dir() and (folder / "test" / "good").is_dir():
        found = mvtec_samples(folder.parent, folder.name, "test")
        return [Item(s.path, s.label, s.defect, s.mask) for s in found], "mvtec"
    if (folder / "labels.csv").is_file():
        return [Item(s.path, s.label, s.defect, s.mask) for s in labelled_folder_samples(folder)], "labels.csv"
    subdirs = sorted(p for p in folder.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and p.name != "ground_truth")
    if (folder / "good").is_dir() and len(subdirs) >= 2:
        gt = folder.parent / "ground_truth"
        items = []
        for sub in subdirs:
            for p in list_images(sub):
                mask = gt / sub.name / f"{p.stem}_mask.png"
                label = int(sub.name != "good")
                items.append(Item(str(p), label, sub.name, str(mask) if label and mask.is_file() else None))
        return items, "good/ vs. other folders"
    raise DataError(
        f"no labels found in {folder}: evaluate needs an MVTec AD category (test/good, test/<defect>), "
        "a labels.csv (columns image,label,defect,mask) or a good/ folder beside folders of anomalous images"
    )


def overlay(image: np.ndarray, amap: np.ndarray, lo: float, hi: float, alpha: float = 0.5) -> np.ndarray:
    """The image beside the image blended with the jet-coloured map (scaled to [lo, hi])."""
    from matplotlib import colormaps

    unit = np.clip((amap - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    heat = (colormaps["jet"](unit)[..., :3] * 255.0).astype(np.float32)
    blend = ((1 - alpha) * image.astype(np.float32) + alpha * heat).round().astype(np.uint8)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([image, gap, blend], axis=1)


def write_overlays(model, items, patch, prep, out_dir: Path, folder: Path, map_range, quiet: bool) -> list[str]:
    """One PNG per item under ``out_dir/maps/`` mirroring ``folder``: the image beside its anomaly map
    (``model.anomaly_maps`` of the patch scores ``patch``), on one colour scale for all (``map_range`` or the
    scores' own range); written atomically. Returns the paths relative to ``out_dir``."""
    lo, hi = map_range if map_range else (float(patch.min()), float(patch.max()))
    names = []
    for item, ps in progress(list(zip(items, patch)), desc="maps", disable=quiet, mininterval=0.5):
        image, _ = prepare(item.path if hasattr(item, "path") else item, prep.get("resize", 256), prep.get("crop", 224))
        amap = model.anomaly_maps(ps[None], image.shape[:2])[0]
        rel = Path(item.path if hasattr(item, "path") else item).resolve().relative_to(folder.resolve())
        # a.png stays maps/a.png; a.jpg becomes maps/a.jpg.png (so a.jpg and a.png never share a map)
        target = out_dir / "maps" / (rel if rel.suffix.lower() == ".png" else rel.with_name(rel.name + ".png"))
        with atomic_path(target, suffix=".png") as tmp:
            Image.fromarray(overlay(image, amap, lo, hi)).save(tmp, format="PNG")
        names.append(str(target.relative_to(out_dir)))
    return names
