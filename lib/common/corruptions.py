"""Seeded image corruptions (the distribution shifts of RoDA Sec. 4.1), built on ``imagecorruptions``.

RoDA follows the corruption protocol of Hendrycks & Dietterich (ImageNet-C) through the
``imagecorruptions`` package and uses four corruptions at severity 5: Gaussian noise, defocus blur,
brightness and contrast (:data:`CORRUPTIONS`). All 19 corruptions of the package are available for
extra experiments (:func:`all_corruption_names`).

Where the corruption is applied: the stage (:data:`STAGES`, the profile setting ``corruption.stage``)
    ``native``  the paper's protocol, as the public MVTec corruption script of GNL/ADShift
                (``generate_corrupted_mvtec.py``) does it: the image is corrupted at its native (original)
                resolution, *before* the resize to 256 px, so the later downsampling averages the Gaussian
                noise (by about ``2 / (3k)`` in standard deviation for a ``k``-fold antialiased bilinear
                reduction) and shrinks the defocus disk ``k``-fold; brightness and contrast are pointwise
                or global and barely change. Where the copy on disk was stored smaller than the original
                (``../shared/data`` holds 256 px copies), :func:`corrupt_native` emulates it: upsample to the
                native size of the task registry (``TaskSpec.native``), corrupt there, downsample with
                antialiasing. Where the file is native (a user's own MVTec download), it corrupts directly.
    ``working`` the harsher stress protocol: corrupt **after** the resize of the shorter side to 256 px, on
                the image the network sees (before the 224 px center crop); the noise and blur reach the
                network at their full strength.
    Clean images (no corruption or severity 0) take the same path under both stages. The order is the
    loader's (``lib.common.data.preprocess``); this module provides the functions.

Determinism
    ``imagecorruptions`` draws from the *global* ``np.random`` generator. :func:`corrupt` seeds it
    inside :func:`lib.common.utils.numpy_seed`, which restores the caller's state afterwards, so the output is
    a pure function of ``(image, name, severity, seed)`` and the caller's random stream is untouched.
    That includes ``frost``, which picks one of its texture files with ``np.random``. A lock serialises
    the seeded section between threads (DataLoader workers are processes and need none). Use
    :func:`image_seed` to derive a per-image seed from a key (a path relative to the dataset root is
    the best key: absolute paths differ between machines).

Rounding
    ``imagecorruptions`` converts its float result with ``np.uint8(x)``, which *truncates* (e.g. 127.9
    becomes 127) instead of rounding. We keep that behaviour everywhere, including in our own fixed
    implementations, so that outputs match the package bit for bit. It biases outputs down by half a
    grey level on average; e.g. ``contrast`` maps a constant image of 100 to 99 (100 / 255 * 255 is
    99.99999...).

Fixes for imagecorruptions 1.1.2 (the PyPI release, 2020) on NumPy 2 / scikit-image >= 0.19
    An exhaustive check of the 19 corruptions at severities 1-5 on 32x32, 33x47, 37x32, 48x80, 80x48,
    64x64, 256x256, 256x341 and 341x256 RGB images found three failures and one silent loss of
    determinism, which we reimplement here from their documented formulas (everything else calls the
    package unchanged):

    - ``gaussian_blur``: ``skimage.filters.gaussian(..., multichannel=True)`` no longer exists; we blur
      with ``channel_axis=-1`` (same sigmas 1, 2, 3, 4, 6; same 'nearest' border, truncate 4).
    - ``glass_blur``: same ``multichannel`` failure. Our version keeps the package's semantics exactly,
      including the random-number stream (one ``randint(-d, d, size=2)`` per pixel, visited bottom-right
      to top-left) and a quirk of the original: the intended pixel *swap* is written as a tuple
      assignment of NumPy views, so it actually *copies* the displaced pixel onto the current one. The
      pixel loop runs on a Python list, about 20x faster than the package's NumPy-indexed loop.
    - ``fog``: the plasma fractal allocates with ``np.float_``, removed in NumPy 2. We reimplement the
      diamond-square fractal with float64 and the same order of random draws.
    - ``impulse_noise``: runs but is *not reproducible*: ``skimage.util.random_noise`` stopped using the
      global ``np.random`` (scikit-image >= 0.19 draws from a fresh ``default_rng()`` unless given
      ``rng``), so seeding had no effect. We call it with ``rng`` = a Generator seeded from the (seeded)
      global state; same salt-and-pepper model and amounts (0.03, 0.06, 0.09, 0.17, 0.27 of the values,
      each channel independently), different random stream than 2020-era scikit-image.

    No monkeypatching: the package is imported but never modified. ``imagecorruptions`` imports
    ``pkg_resources``, which setuptools >= 82 removed; the import is lazy and fails with the fix
    (``pip install 'setuptools<81'``) in its message.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

# one definition of each list, in lib/common/registry.py: the four corruptions of RoDA Sec. 4.1, all 19 of
# imagecorruptions, and the 32 px per side the package needs
from lib.common.registry import ALL_CORRUPTIONS, MIN_SIDE
from lib.common.registry import PAPER_CORRUPTIONS as CORRUPTIONS
from lib.common.utils import numpy_seed, stable_hash

__all__ = [
    "CORRUPTIONS",
    "ALL_CORRUPTIONS",
    "STAGES",
    "native_size",
    "corrupt_native",
    "MIN_SIDE",
    "CorruptionSpec",
    "all_corruption_names",
    "corrupt",
    "image_seed",
    "to_rgb_uint8",
]


_CLEAN_NAMES = (None, "clean", "none")

#: where a corruption is applied: at the image's native resolution before the resize (the paper's protocol), or
#: on the resized working image (the harsher stress protocol); see the module docstring
STAGES = ("native", "working")
_LOCK = threading.RLock()
_PACKAGE = None


def all_corruption_names() -> list[str]:
    """The 19 corruption names of ``imagecorruptions.get_corruption_names('all')``."""
    return list(ALL_CORRUPTIONS)


def _package():
    """Import ``imagecorruptions`` lazily (it is slow-ish and needs ``pkg_resources``)."""
    global _PACKAGE
    if _PACKAGE is None:
        try:
            with warnings.catch_warnings():
                # "pkg_resources is deprecated" and "scipy.ndimage.interpolation is deprecated"
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                import imagecorruptions
        except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
            if err.name == "pkg_resources":
                raise ModuleNotFoundError(
                    "imagecorruptions 1.1.2 imports pkg_resources, which setuptools>=82 removed: "
                    "run `pip install 'setuptools<81'`"
                ) from err
            raise ModuleNotFoundError(
                "the corruptions need the imagecorruptions package: run `pip install imagecorruptions==1.1.2`"
            ) from err
        _PACKAGE = imagecorruptions
    return _PACKAGE


# --------------------------------------------------------------------------------------------- input


def to_rgb_uint8(image) -> np.ndarray:
    """A uint8 HxWx3 copy of ``image`` (numpy HxW / HxWx{1,3,4} uint8, or a PIL image).

    Gray is repeated over three channels (as imagecorruptions does); an alpha channel is dropped.
    """
    if not isinstance(image, np.ndarray):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover
            Image = None
        if Image is not None and isinstance(image, Image.Image):
            if image.mode not in ("L", "RGB", "RGBA"):
                image = image.convert("RGB")
            image = np.asarray(image)
        else:
            raise TypeError(f"expected a numpy array or a PIL image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image, got dtype {image.dtype}: convert first, e.g. "
            "np.clip(x * 255, 0, 255).astype(np.uint8) for floats in [0, 1]"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected an HxW or HxWx{{1,3,4}} image, got shape {image.shape}")
    return np.ascontiguousarray(image).copy()


def _check_size(image: np.ndarray) -> None:
    small = min(image.shape[:2])
    if small < MIN_SIDE:
        raise ValueError(
            f"image is {small} px on its shorter side (shape {image.shape[:2]}); corruptions need at "
            f"least {MIN_SIDE} px: resize first"
        )


def _check_name(name) -> str | None:
    if name in _CLEAN_NAMES:
        return None
    if not isinstance(name, str) or name not in ALL_CORRUPTIONS:
        raise ValueError(
            f"unknown corruption {name!r}; valid names: {', '.join(ALL_CORRUPTIONS)} "
            f"(or None / 'clean' for no corruption)"
        )
    return name


def _check_severity(severity) -> int:
    if isinstance(severity, (bool, np.bool_)) or not isinstance(severity, (int, np.integer)):
        raise ValueError(f"severity must be an integer in 0..5, got {severity!r}")
    severity = int(severity)
    if not 0 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 0..5 (0 = clean), got {severity}")
    return severity


# ------------------------------------------------------------------------ fixed corruption functions
# Each takes a uint8 HxWx3 array and a severity 1..5 and returns floats in [0, 255]; the caller
# truncates with np.uint8 exactly like imagecorruptions.corrupt does.


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.filters import gaussian

    return gaussian(x, sigma=sigma, channel_axis=-1)


def _gaussian_blur(x: np.ndarray, severity: int) -> np.ndarray:
    sigma = (1, 2, 3, 4, 6)[severity - 1]
    return np.clip(_gaussian(x / 255.0, sigma), 0, 1) * 255


def _glass_blur(x: np.ndarray, severity: int) -> np.ndarray:
    # (blur sigma, maximal displacement, number of shuffling passes)
    sigma, delta, passes = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[severity - 1]
    height, width = x.shape[:2]
    blurred = np.uint8(_gaussian(x / 255.0, sigma) * 255)

    # Pixels visited per pass: rows height-delta .. delta+1, and within each row columns
    # width-delta .. delta+1, both descending. One (dx, dy) draw per visited pixel, in that order.
    rows = np.arange(height - delta, delta, -1)
    cols = np.arange(width - delta, delta, -1)
    targets = (rows[:, None] * width + cols[None, :]).ravel()
    if targets.size:
        draws = np.random.randint(-delta, delta, size=(passes * targets.size, 2))
        dx, dy = draws[:, 0], draws[:, 1]
        sources = np.tile(targets, passes) + dy * width + dx
        pixels = [tuple(p) for p in blurred.reshape(-1, 3).tolist()]
        for t, s in zip(np.tile(targets, passes).tolist(), sources.tolist()):
            pixels[t] = pixels[s]  # a copy, not a swap: see the module docstring
        blurred = np.asarray(pixels, dtype=np.uint8).reshape(height, width, 3)
    return np.clip(_gaussian(blurred / 255.0, sigma), 0, 1) * 255


def _plasma_fractal(size: int, decay: float) -> np.ndarray:
    """Diamond-square height map on a ``size`` x ``size`` torus (size a power of two), in [0, 1].

    Each refinement sets new points to the mean of their four neighbours plus uniform noise of
    amplitude ``w**2`` (``w * U(-w, w)``), with ``w`` starting at 100 and divided by ``decay`` per level.
    """
    if size < 1 or size & (size - 1):
        raise ValueError(f"plasma fractal size must be a power of two, got {size}")
    grid = np.zeros((size, size), dtype=np.float64)
    step, w = size, 100.0

    def noisy_mean(total):
        return total / 4 + w * np.random.uniform(-w, w, total.shape)

    while step >= 2:
        half = step // 2
        # square step: centres of the cells get the mean of the four cell corners
        corners = grid[0::step, 0::step]
        total = corners + np.roll(corners, -1, axis=0)
        total = total + np.roll(total, -1, axis=1)
        grid[half::step, half::step] = noisy_mean(total)
        # diamond step: edge midpoints get the mean of the two adjacent centres and two corners
        centres = grid[half::step, half::step]
        corners = grid[0::step, 0::step]
        total = (centres + np.roll(centres, 1, axis=0)) + (corners + np.roll(corners, -1, axis=1))
        grid[0::step, half::step] = noisy_mean(total)
        total = (centres + np.roll(centres, 1, axis=1)) + (corners + np.roll(corners, -1, axis=0))
        grid[half::step, 0::step] = noisy_mean(total)
        step = half
        w /= decay

    grid -= grid.min()
    return grid / grid.max()


def _fog(x: np.ndarray, severity: int) -> np.ndarray:
    strength, decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[severity - 1]
    height, width = x.shape[:2]
    size = 1 << (max(height, width, 3) - 1).bit_length()  # next power of two of the largest dim
    x = x / 255.0
    peak = x.max()
    x = x + strength * _plasma_fractal(size, decay)[:height, :width, None]
    return np.clip(x * peak / (peak + strength), 0, 1) * 255


def _impulse_noise(x: np.ndarray, severity: int) -> np.ndarray:
    from skimage.util import random_noise

    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))  # seeded via the global state
    return np.clip(random_noise(x / 255.0, mode="s&p", amount=amount, rng=rng), 0, 1) * 255


_FIXED = {"gaussian_blur": _gaussian_blur, "glass_blur": _glass_blur, "fog": _fog, "impulse_noise": _impulse_noise}


# ----------------------------------------------------------------------------------------- public


def corrupt(image, name: str | None, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt ``image`` with corruption ``name`` at ``severity``; a new uint8 HxWx3 array.

    ``image``: uint8 HxW or HxWx{1,3,4} numpy array, or a PIL image, both sides >= 32 px.
    ``severity``: 0 returns the (RGB) image unchanged; 1..5 are the ImageNet-C levels.
    ``name``: one of :func:`all_corruption_names`; ``None`` or ``"clean"`` means no corruption.
    ``seed``: any int; the result is a pure function of (image, name, severity, seed) and the global
    NumPy random state is left as it was.
    """
    name = _check_name(name)
    severity = _check_severity(severity)
    rgb = to_rgb_uint8(image)
    _check_size(rgb)
    if name is None or severity == 0:
        return rgb
    if name in _FIXED:
        function = _FIXED[name]
    else:
        package = _package()

        def function(x, s):
            return package.corrupt(x, severity=s, corruption_name=name)

    with _LOCK, numpy_seed(int(seed)):
        out = function(rgb, severity)
    out = np.asarray(out)
    if out.dtype != np.uint8:
        out = np.uint8(out)  # truncation, exactly as imagecorruptions.corrupt does
    return to_rgb_uint8(out)


def image_seed(key, seed: int = 0) -> int:
    """A 32-bit seed for one image, the same in every process and on every run.

    ``key`` is usually the image path; prefer a path relative to the dataset root so that seeds do
    not change with where the data lives.
    """
    return stable_hash("corruption", str(key), int(seed))


@dataclass(frozen=True)
class CorruptionSpec:
    """A corruption and its severity; ``CorruptionSpec(None, 0)`` (or severity 0) is the clean set."""

    name: str | None = None
    severity: int = 0

    def __post_init__(self):
        name = _check_name(self.name)
        severity = _check_severity(self.severity)
        if name is None:
            severity = 0
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "severity", severity)

    @property
    def is_clean(self) -> bool:
        return self.name is None or self.severity == 0

    @property
    def label(self) -> str:
        """``"gaussian_noise@5"``, or ``"clean"``."""
        return "clean" if self.is_clean else f"{self.name}@{self.severity}"

    @classmethod
    def parse(cls, label: str) -> CorruptionSpec:
        """Inverse of :attr:`label`: ``"contrast@5"`` or ``"clean"``; a bare name means severity 5."""
        label = label.strip()
        if label in ("clean", "none", ""):
            return cls(None, 0)
        name, _, severity = label.partition("@")
        return cls(name, int(severity) if severity else 5)

    def apply(self, image, seed: int = 0) -> np.ndarray:
        return corrupt(image, self.name, self.severity, seed)

    def __str__(self) -> str:
        return self.label


# ------------------------------------------------------------------------------------------ the stage


#: the stage of result rows (or tables) that record none: they were written before the stage was a setting, when every
#: corruption was applied to the resized working image
UNRECORDED_STAGE = "working"


def stage_of(table: pd.DataFrame) -> pd.Series:
    """The corruption stage of each row of a result table (:data:`UNRECORDED_STAGE` where it records none)."""
    if "stage" not in table.columns:
        return pd.Series(UNRECORDED_STAGE, index=table.index, dtype=object)
    return table["stage"].fillna(UNRECORDED_STAGE)


def check_stage(stage) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown corruption stage {stage!r}: choose one of {', '.join(STAGES)} "
                         "(corruption.stage in a profile)")
    return stage


def native_size(stored_hw, native=None) -> tuple[int, int]:
    """(height, width) the ``native`` stage corrupts at, for a file stored at ``stored_hw``.

    ``native``: the dataset's original (height, width) (``TaskSpec.native``; a side ``None`` follows the stored
    aspect). A file smaller than that was stored downsampled: the original size is emulated. A file as large or
    larger, or ``native=None``: the file is native and is corrupted at its own size."""
    h, w = int(stored_hw[0]), int(stored_hw[1])
    if native is None:
        return h, w
    nh, nw = native
    if nh is None and nw is None:
        return h, w
    nh = int(round(h * nw / w)) if nh is None else int(nh)
    nw = int(round(w * nh / h)) if nw is None else int(nw)
    return (h, w) if nh <= h and nw <= w else (nh, nw)


def corrupt_native(image, out_wh, name: str | None, severity: int, seed: int = 0, native=None,
                   upsample: str = "bilinear") -> np.ndarray:
    """The ``native`` stage: ``image`` (a PIL image or uint8 array at its stored size) corrupted at its native
    size (:func:`native_size`) and resized to ``out_wh`` = (width, height) with PIL's antialiased bilinear
    filter, as the working pipeline resizes; a uint8 HxWx3 array.

    A file stored smaller than ``native`` is first upsampled to it (``upsample``: PIL ``"bilinear"`` or
    ``"bicubic"``): the emulation of corrupting the original. Clean (``name`` None or severity 0): only the resize,
    the same pixels as the ``working`` stage."""
    from PIL import Image

    rgb = to_rgb_uint8(image)
    picture = Image.fromarray(rgb)
    out_wh = (int(out_wh[0]), int(out_wh[1]))
    if _check_name(name) is None or _check_severity(severity) == 0:
        return np.asarray(picture.resize(out_wh, Image.BILINEAR), dtype=np.uint8)
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
    if upsample not in filters:
        raise ValueError(f"upsample must be one of {sorted(filters)}, got {upsample!r}")
    nh, nw = native_size(rgb.shape[:2], native)
    if (nh, nw) != rgb.shape[:2]:
        picture = picture.resize((nw, nh), filters[upsample])
    shifted = corrupt(np.asarray(picture), name, severity, seed)
    return np.asarray(Image.fromarray(shifted).resize(out_wh, Image.BILINEAR), dtype=np.uint8)
