"""Small deterministic anomaly-detection data sets for tests and the smoke profile (no download).

Two layouts:

- :func:`make_synthetic_mvtec` writes the MVTec AD layout (``CATEGORY/train/good``, ``CATEGORY/test/good``,
  ``CATEGORY/test/<defect>``, ``CATEGORY/ground_truth/<defect>/NNN_mask.png``), read by
  ``lib.common.data.mvtec_samples``.
- :func:`make_synthetic_labelled` writes a labelled folder (``labels.csv`` with columns
  ``image,label,defect,mask``, paths relative to the folder), read by ``lib.common.data.labelled_folder_samples``;
  it has four defect classes so the open-set (DPDL) protocol has seen and unseen classes.

Images are RGB textures that look alike across the set (oriented wood-like stripes at a fixed period,
a smooth random field and fine grain, each with per-image random phase), so normals are a narrow
distribution. Defects are painted where the mask is 255 (masks are 0/255 PNGs; a defect image always
has a non-empty mask, a normal one has none), and are big and contrasted enough for a PatchCore on an
ImageNet backbone: a bright scratch, a dark spot, a blue-grey stain, a dark thin crack. Defect centres
lie in the middle 60% of the image so that the loader's 224/256 center crop keeps them.

Everything is a function of the arguments: the same call writes byte-identical PNGs (each image has its
own generator seeded from ``seed`` and a hash of its name). Writes are atomic and idempotent: the set
is built in a hidden temporary folder next to its target and renamed into place, and a second call
with the same arguments returns at once. A marker file ``.synthetic.json`` records the arguments; a
call with other arguments replaces a folder that has the marker and refuses to touch one that has not.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from lib.common.utils import stable_hash

__all__ = [
    "DEFECT_TYPES",
    "MARKER",
    "make_synthetic_labelled",
    "make_synthetic_mvtec",
    "render_defect",
    "render_texture",
]

MARKER = ".synthetic.json"
_FORMAT_VERSION = 1  # bump when the rendering changes, so that old sets are rebuilt


# ----------------------------------------------------------------------------------------- textures


def render_texture(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A normal sample: float RGB (size, size, 3) in [0, 255]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = np.deg2rad(30 + rng.uniform(-4, 4))
    period = size / 12 * rng.uniform(0.95, 1.05)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    across = -xx * np.sin(angle) + yy * np.cos(angle)
    wobble = 1.5 * np.sin(2 * np.pi * across / (size * 0.7) + rng.uniform(0, 2 * np.pi))
    stripes = np.sin(2 * np.pi * (along + wobble) / period + rng.uniform(0, 2 * np.pi))

    field = gaussian_filter(rng.normal(size=(size, size)), sigma=size / 16, mode="wrap")
    field /= field.std() + 1e-12
    grain = rng.normal(size=(size, size, 3)) * 3.0

    base = np.array([150.0, 118.0, 84.0])
    gain = np.array([1.0, 0.85, 0.65])
    shade = 16.0 * stripes + 9.0 * field
    return np.clip(base + shade[..., None] * gain + grain, 0, 255)


def _centre(rng, size):
    return rng.uniform(0.2 * size, 0.8 * size, size=2)


def _scratch(rng, size, canvas):
    x0, y0 = _centre(rng, size)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.3, 0.45) * size
    bend = rng.uniform(-0.25, 0.25)
    points = []
    for t in (-0.5, 0.0, 0.5):
        a = angle + (bend if t > 0 else 0.0)
        points.append((x0 + t * length * np.cos(a), y0 + t * length * np.sin(a)))
    canvas.line(points, fill=255, width=max(2, round(size / 45)), joint="curve")
    return np.array([236.0, 232.0, 220.0])


def _spot(rng, size, canvas):
    x0, y0 = _centre(rng, size)
    rx, ry = rng.uniform(0.05, 0.09, size=2) * size
    canvas.ellipse([x0 - rx, y0 - ry, x0 + rx, y0 + ry], fill=255)
    return np.array([48.0, 36.0, 30.0])


def _stain(rng, size, canvas):
    x0, y0 = _centre(rng, size)
    radius = rng.uniform(0.09, 0.13) * size
    n = 9
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
    radii = radius * rng.uniform(0.6, 1.0, size=n)
    canvas.polygon([(x0 + r * np.cos(a), y0 + r * np.sin(a)) for a, r in zip(angles, radii)], fill=255)
    return np.array([95.0, 120.0, 165.0])


def _crack(rng, size, canvas):
    x, y = _centre(rng, size)
    heading = rng.uniform(0, 2 * np.pi)
    step = size / 24
    points = [(x, y)]
    for _ in range(9):
        heading += rng.uniform(-0.7, 0.7)
        x = float(np.clip(x + step * np.cos(heading), 0.1 * size, 0.9 * size))
        y = float(np.clip(y + step * np.sin(heading), 0.1 * size, 0.9 * size))
        points.append((x, y))
    canvas.line(points, fill=255, width=max(2, round(size / 64)), joint="curve")
    return np.array([25.0, 20.0, 18.0])


#: Defect painters: ``name -> painter(rng, size, ImageDraw) -> RGB colour``; they draw the mask.
DEFECT_TYPES = {"scratch": _scratch, "spot": _spot, "stain": _stain, "crack": _crack}


def render_defect(image: np.ndarray, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``defect`` into a copy of ``image``; returns (float RGB image, uint8 mask in {0, 255})."""
    if defect not in DEFECT_TYPES:
        raise ValueError(f"unknown defect {defect!r}; choose from {sorted(DEFECT_TYPES)}")
    size = image.shape[0]
    for _ in range(10):
        mask_image = Image.new("L", (image.shape[1], image.shape[0]), 0)
        colour = DEFECT_TYPES[defect](rng, size, ImageDraw.Draw(mask_image))
        mask = np.asarray(mask_image) > 127
        if mask.any():
            break
    else:  # pragma: no cover - painters always draw something
        raise RuntimeError(f"could not draw a {defect} defect")
    # keep some of the texture inside the defect so that it does not look pasted
    texture = image - image.mean(axis=(0, 1))
    painted = np.clip(colour + 0.35 * texture, 0, 255)
    out = np.where(mask[..., None], 0.85 * painted + 0.15 * image, image)
    return out, (mask * 255).astype(np.uint8)


def _rng(seed: int, *key) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**32, stable_hash(*key)])


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array).round().clip(0, 255).astype(np.uint8)).save(path, format="PNG")


# -------------------------------------------------------------------------------- atomic building


def _build_atomically(target: Path, params: dict, build) -> Path:
    """Run ``build(tmp_folder)`` and rename the result to ``target`` unless it is already there."""
    target = Path(target)
    marker = target / MARKER

    def up_to_date() -> bool:
        try:
            return json.loads(marker.read_text()) == params
        except (OSError, ValueError):
            return False

    if up_to_date():
        return target
    if target.exists() and not marker.exists() and any(target.iterdir()):
        raise FileExistsError(
            f"{target} exists and is not a synthetic data set made by lib.common.synthetic (no {MARKER}): "
            "remove it or choose another root"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data set is not
    old = None
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
        if target.exists():
            if up_to_date():  # another process finished first
                return target
            if marker.exists():  # ours, other arguments: replace it
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "data")
        try:
            os.replace(tmp, target)  # atomic; an empty target folder is replaced too
        except OSError:
            if up_to_date():  # lost a race against an identical build
                return target
            raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _split_counts(total: int, names) -> dict:
    names = list(names)
    return {name: total // len(names) + (k < total % len(names)) for k, name in enumerate(names)}


# ----------------------------------------------------------------------------------------- public


def make_synthetic_mvtec(
    root,
    category: str = "synthetic",
    n_train: int = 16,
    n_test_good: int = 6,
    n_test_defect: int = 6,
    size: int = 128,
    seed: int = 0,
    defects=("scratch", "spot"),
) -> Path:
    """Write a small MVTec-layout category under ``root`` and return ``root`` (the MVTec root).

    ``n_test_defect`` is the total number of defective test images, split as evenly as possible over
    ``defects`` (default 3 "scratch" + 3 "spot"). Files: ``train/good/000.png``, ``test/good/000.png``,
    ``test/<defect>/000.png`` and ``ground_truth/<defect>/000_mask.png`` (0/255), all ``size`` px square.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 px (the corruptions need it), got {size}")
    defects = tuple(defects)
    for name in defects:
        if name not in DEFECT_TYPES:
            raise ValueError(f"unknown defect {name!r}; choose from {sorted(DEFECT_TYPES)}")
    root = Path(root)
    params = dict(
        kind="mvtec", version=_FORMAT_VERSION, category=category, n_train=n_train, n_test_good=n_test_good,
        n_test_defect=n_test_defect, size=size, seed=seed, defects=list(defects),
    )

    def build(folder: Path) -> None:
        for split, count in (("train", n_train), ("test", n_test_good)):
            for i in range(count):
                image = render_texture(_rng(seed, category, split, "good", i), size)
                _save_png(image, folder / split / "good" / f"{i:03d}.png")
        for name, count in _split_counts(n_test_defect, defects).items():
            (folder / "test" / name).mkdir(parents=True, exist_ok=True)
            (folder / "ground_truth" / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = _rng(seed, category, "test", name, i)
                image, mask = render_defect(render_texture(rng, size), name, rng)
                _save_png(image, folder / "test" / name / f"{i:03d}.png")
                _save_png(mask, folder / "ground_truth" / name / f"{i:03d}_mask.png")

    _build_atomically(root / category, params, build)
    return root


def make_synthetic_labelled(
    root,
    n_normal: int = 24,
    n_per_defect: int = 6,
    defects=("scratch", "spot", "stain", "crack"),
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a labelled-folder data set at ``root`` and return ``root``.

    ``labels.csv`` has one row per image, columns ``image,label,defect,mask`` with paths relative to
    ``root``: normals are ``images/good_000.png``, 0, ``good``, empty mask; anomalies
    ``images/<defect>_000.png``, 1, ``<defect>``, ``masks/<defect>_000_mask.png``.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 px (the corruptions need it), got {size}")
    defects = tuple(defects)
    if len(defects) < 1:
        raise ValueError("need at least one defect class")
    for name in defects:
        if name not in DEFECT_TYPES:
            raise ValueError(f"unknown defect {name!r}; choose from {sorted(DEFECT_TYPES)}")
    root = Path(root)
    params = dict(
        kind="labelled", version=_FORMAT_VERSION, n_normal=n_normal, n_per_defect=n_per_defect,
        defects=list(defects), size=size, seed=seed,
    )

    def build(folder: Path) -> None:
        rows = []
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir(parents=True)
        for i in range(n_normal):
            image = render_texture(_rng(seed, "labelled", "good", i), size)
            _save_png(image, folder / "images" / f"good_{i:03d}.png")
            rows.append((f"images/good_{i:03d}.png", 0, "good", ""))
        for name in defects:
            for i in range(n_per_defect):
                rng = _rng(seed, "labelled", name, i)
                image, mask = render_defect(render_texture(rng, size), name, rng)
                _save_png(image, folder / "images" / f"{name}_{i:03d}.png")
                _save_png(mask, folder / "masks" / f"{name}_{i:03d}_mask.png")
                rows.append((f"images/{name}_{i:03d}.png", 1, name, f"masks/{name}_{i:03d}_mask.png"))
        with open(folder / "labels.csv", "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(("image", "label", "defect", "mask"))
            writer.writerows(rows)

    _build_atomically(root, params, build)
    return root
