"""One registry of names: the tasks (datasets), the corruptions and the methods of both papers.

A name resolves here, and only here, to what it means; unknown names raise :class:`RegistryError` with the
known names and the closest matches. Nothing heavy is imported: the method tables are named by dotted
paths (:data:`METHOD_TABLES`) and imported on :func:`methods`, so any module may import the registry without an
import cycle.

Tasks
    :data:`TASKS` maps a task name to a :class:`TaskSpec`: the loader kind (how ``lib.common.data`` reads it), the
    folder under the data root, the RoDA-side geometry (resize / center crop), the protocols it serves and
    the row of the papers' tables it corresponds to. KolektorSDD has two tasks: ``ksdd`` (the whole ~256 x 640
    strips, RoDA side) and ``ksdd_thirds`` (each strip cut into three 256 x ~213 images, DPDL's protocol, the
    paper's "SDD"). A user's own data is a task too: :func:`task` accepts a path to an MVTec-layout category
    folder (``train/good``, ``test/<defect>``, optional ``ground_truth``) or to a folder with ``labels.csv``.

Corruptions
    :data:`PAPER_CORRUPTIONS` (RoDA Sec. 4.1, at severity 5), :data:`ALL_CORRUPTIONS` (every name of
    ``imagecorruptions.get_corruption_names('all')``, in the package's order) and :data:`EXTRA_CORRUPTIONS`
    (your own, name -> dotted path of the function).

Methods
    :func:`methods` reads the two sides' own tables: ``"alignment"`` (RoDA side,
    ``lib.roda.alignment.ALIGNMENT_LOSSES``; ``"patchcore"`` = no adaptation) and ``"openset"`` (DPDL side,
    ``lib.dpdl.baselines.METHODS``). :data:`TABLE4_ROWS` names the rows of RoDA's Table 4 (the paper's label and
    the RoDA grid's method name of each).

To add a dataset or a corruption, add one entry here; a method is one entry in its side's table
(docs/extending.md).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "RegistryError", "TaskSpec", "TASKS", "MVTEC_CATEGORIES", "PAPER_CORRUPTIONS", "ALL_CORRUPTIONS",
    "MIN_SIDE", "EXTRA_CORRUPTIONS", "METHOD_TABLES", "methods", "task", "task_name", "task_root",
    "geometry", "corruption", "corruption_function", "method", "method_path", "paper_row", "LOADER_KINDS",
    "unknown", "TABLE4_ROWS", "TABLE4_ABLATION",
]


class RegistryError(KeyError):
    """An unknown name; the message lists the known names and the closest matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def unknown(kind: str, name, known) -> RegistryError:
    """The error for an unknown ``name`` of ``kind``: the close matches first, then every known name."""
    known = sorted(map(str, known))
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return RegistryError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}")


# ----------------------------------------------------------------------------------------------------
# Images and corruptions
# ----------------------------------------------------------------------------------------------------

#: imagecorruptions refuses images with a side below 32 px; the loaders refuse them too.
MIN_SIDE = 32

#: The four corruptions of RoDA (Sec. 4.1), used at severity 5.
PAPER_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "brightness", "contrast")

#: All names of ``imagecorruptions.get_corruption_names('all')``, in the package's order: the 15 common
#: (ImageNet-C) corruptions, then the 4 validation ones.
ALL_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate",
)

#: Corruptions beyond imagecorruptions: name -> dotted path of ``f(image, severity) -> image`` (uint8 HxWx3 in
#: and out, severity 1..5). ``lib.common.corruptions.corrupt`` runs it under a seeded NumPy global state like the
#: package's own, so a function drawing from ``np.random`` is deterministic per (image, name, severity, seed).
EXTRA_CORRUPTIONS: dict[str, str] = {}

CLEAN = "clean"


def corruption(name: str) -> str:
    """``name`` if it is a known corruption (or ``"clean"``); otherwise :class:`RegistryError`."""
    if name == CLEAN or name in ALL_CORRUPTIONS or name in EXTRA_CORRUPTIONS:
        return name
    raise unknown("corruption", name, (CLEAN, *ALL_CORRUPTIONS, *EXTRA_CORRUPTIONS))


def corruption_function(name: str):
    """The function of an :data:`EXTRA_CORRUPTIONS` entry, imported on first use."""
    if name not in EXTRA_CORRUPTIONS:
        raise unknown("extra corruption", name, EXTRA_CORRUPTIONS)
    return _resolve(EXTRA_CORRUPTIONS[name])


# ----------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
)

#: how ``lib.common.data`` reads a task: the embedded ELPV set, an MVTec-layout category folder, a folder with
#: ``labels.csv`` (columns path, label[, mask]), or one of the generated sets of ``lib.common.synthetic``
LOADER_KINDS = ("elpv", "mvtec", "labelled", "synthetic", "synthetic_labelled")
SQUARE = dict(resize=256, crop=224)  # PatchCore's geometry: shorter side 256, center crop 224

#: original (height, width) of the MVTec AD categories (Bergmann et al., IJCV 2021, Table 1: 700-1024 px squares;
#: ../shared/data/README.md for the copies used here); categories not listed: the file's own size is native
MVTEC_NATIVE = {"bottle": (900, 900), "cable": (1024, 1024), "capsule": (1000, 1000), "carpet": (1024, 1024),
                "grid": (1024, 1024), "hazelnut": (1024, 1024), "leather": (1024, 1024), "metal_nut": (700, 700),
                "pill": (800, 800), "screw": (1024, 1024), "tile": (840, 840), "toothbrush": (1024, 1024),
                "transistor": (1024, 1024), "wood": (1024, 1024), "zipper": (1024, 1024)}
_MVTEC_SOURCE = "MVTec AD (Bergmann et al., IJCV 2021, Table 1): original image size of the category"
_KSDD_NATIVE = ("KolektorSDD (Tabernik et al. 2019): 500 px wide, 1240-1270 px tall; the copy in ../shared/data is "
                "256 px wide, so the height follows the stored aspect (641-648 px -> about 1250)")


@dataclass(frozen=True)
class TaskSpec:
    """What a task name means.

    ``loader``: one of :data:`LOADER_KINDS`. ``folder``: the folder the data lives in, relative to the data
    root (``mvtec/<category>`` tasks: the category; user tasks: an absolute path). ``geometry``: resize /
    center crop on the RoDA side (the open-set protocol resizes to a square of its ``image_size``).
    ``protocols``: ``"roda"`` (PatchCore / RoDA notebooks 02-04) and/or ``"openset"`` (notebook 05).
    ``thirds``: cut each image into three along its long side (KolektorSDD as DPDL uses it).
    ``paper``: (dataset, category) of the papers' result tables, None where the papers have no row.
    ``native``: (height, width) of the dataset's original images, where the copy on disk may be stored smaller
    (the ``native`` corruption stage, :func:`lib.common.corruptions.corrupt_native`, emulates the original
    resolution from it); a side given as ``None`` follows the stored image's aspect; ``None`` (a user's own folder,
    the generated sets, images stored at their original size): the file's own size is native.
    ``native_source``: where that size comes from.
    """

    name: str
    loader: str
    folder: str | None = None
    geometry: dict = field(default_factory=lambda: dict(SQUARE))
    protocols: tuple = ("roda", "openset")
    thirds: bool = False
    paper: tuple | None = None
    description: str = ""
    native: tuple | None = None
    native_source: str = ""

    def __post_init__(self):
        if self.loader not in LOADER_KINDS:
            raise ValueError(f"task {self.name}: loader must be one of {LOADER_KINDS}, got {self.loader!r}")

    @property
    def category(self) -> str | None:
        """The MVTec category (the folder's name) of an MVTec-layout task."""
        return Path(self.folder).name if self.loader == "mvtec" and self.folder else None


def _builtin_tasks() -> dict:
    tasks = [
        TaskSpec("elpv", "elpv", paper=("ELPV", None), native=(300, 300),
                 native_source="elpv-dataset: the cells ship at their original 300 x 300 px",
                 description="embedded ELPV solar cells (2,624 images, no masks)"),
        TaskSpec("synthetic", "synthetic", "synthetic", protocols=("roda",),
                 description="generated MVTec-layout set with masks (tests, smoke profile)"),
        TaskSpec("synthetic_labelled", "synthetic_labelled", "synthetic_labelled", protocols=("openset",),
                 description="generated labels.csv set with defect classes (tests, smoke profile)"),
        # KolektorSDD strips are ~256 x 640 (w x h): keep the whole strip, no crop (a 224 crop would cut away
        # most of the surface where the cracks are)
        TaskSpec("ksdd", "labelled", "ksdd", geometry=dict(resize=(448, 160), crop=None), protocols=("roda",),
                 native=(None, 500), native_source=_KSDD_NATIVE, description="KolektorSDD, whole strips"),
        TaskSpec("ksdd_thirds", "labelled", "ksdd", protocols=("openset",), thirds=True, paper=("SDD", None),
                 native=(None, 500), native_source=_KSDD_NATIVE,
                 description="KolektorSDD, each strip cut into thirds (DPDL's SDD)"),
        TaskSpec("headct", "labelled", "headct", paper=("HeadCT", None), description="Head CT hemorrhage"),
        TaskSpec("brainmri", "labelled", "brainmri", paper=("BrainMRI", None), description="Brain MRI tumour"),
    ]
    tasks += [TaskSpec(f"mvtec/{c}", "mvtec", c, paper=("MVTec", c), description=f"MVTec AD {c}",
                       native=MVTEC_NATIVE.get(c), native_source=_MVTEC_SOURCE if c in MVTEC_NATIVE else "")
              for c in MVTEC_CATEGORIES]
    # MVTec 3D-AD tire (RGB images only, MVTec AD layout): no row in the papers
    tasks.append(TaskSpec("mvtec/tire", "mvtec", "tire", protocols=("roda",), native=(600, 800),
                          native_source="MVTec 3D-AD (Bergmann et al. 2022): tire RGB images are 600 x 800 "
                                        "(height x width, as ../shared/data/README.md records it)",
                          description="MVTec 3D-AD tire (RGB)"))
    return {t.name: t for t in tasks}


#: task name -> :class:`TaskSpec`
TASKS: dict[str, TaskSpec] = _builtin_tasks()


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or Path(name).expanduser().is_dir()


def _path_task(name: str) -> TaskSpec:
    path = Path(name).expanduser().resolve()
    if (path / "labels.csv").is_file():
        return TaskSpec(str(path), "labelled", str(path), description=f"labelled folder {path}")
    if (path / "train" / "good").is_dir() and (path / "test").is_dir():
        return TaskSpec(str(path), "mvtec", str(path), description=f"MVTec-layout folder {path}")
    raise RegistryError(
        f"{path} is neither an MVTec-layout category folder (train/good/ and test/<defect>/) nor a folder with "
        "labels.csv (columns path,label[,mask]): point to one of those")


def task_name(name: str) -> str:
    """The registry name of ``name``: a short MVTec category becomes ``mvtec/<category>``."""
    name = str(name).strip()
    if name in TASKS:
        return name
    if name in MVTEC_CATEGORIES:
        return f"mvtec/{name}"
    if _looks_like_path(name):
        return name
    raise unknown("task", name, (*TASKS, *MVTEC_CATEGORIES))


def task(name, protocol: str | None = None) -> TaskSpec:
    """The :class:`TaskSpec` of a task name, a short MVTec category or a path to the user's own folder.

    ``protocol`` (``"roda"`` / ``"openset"``): refuse a task that the protocol does not serve, naming the one
    that does (``ksdd`` vs ``ksdd_thirds``)."""
    name = task_name(str(name))
    spec = TASKS[name] if name in TASKS else _path_task(name)
    if protocol is not None and protocol not in spec.protocols:
        others = [t.name for t in TASKS.values() if t.folder == spec.folder and protocol in t.protocols]
        hint = f"; use {others[0]!r}" if others else ""
        raise RegistryError(f"task {name!r} is not part of the {protocol} protocol{hint}")
    return spec


def task_root(name, data_root=None) -> Path | None:
    """The folder a task reads from, given the data root of a profile.

    MVTec tasks: ``data_root/<category>`` or ``data_root/mvtec/<category>`` (as ``shared/data`` holds it), the
    MVTec root is returned. Labelled folders: ``data_root/<folder>`` when it holds ``labels.csv``, else
    ``data_root`` itself. User paths: the path (MVTec layout: its parent). ELPV: None (embedded)."""
    spec = task(name)
    if spec.loader == "elpv":
        return None
    folder = Path(spec.folder) if spec.folder else None
    if folder is not None and folder.is_absolute():
        return folder.parent if spec.loader == "mvtec" else folder
    if data_root is None:
        return None
    root = Path(data_root).expanduser()
    if spec.loader == "mvtec":
        return root / "mvtec" if (root / "mvtec" / spec.folder).is_dir() else root
    if spec.loader == "labelled":
        return root / spec.folder if (root / spec.folder / "labels.csv").is_file() else root
    return root


def geometry(name, protocol: str = "roda", image_size: int = 224) -> dict:
    """resize / crop of a task: its own on the RoDA side; a square ``image_size`` without crop (DRA/DevNet's
    ``Resize((s, s))``) on the open-set side."""
    if protocol == "openset":
        return dict(resize=(int(image_size), int(image_size)), crop=None)
    if protocol != "roda":
        raise unknown("protocol", protocol, ("roda", "openset"))
    return dict(task(name).geometry)


def paper_row(name) -> tuple | None:
    """(dataset, category) of the papers' tables for a task, None where the papers have no row."""
    return TASKS[name].paper if name in TASKS else None


# ----------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------

#: side -> the table of that side's methods, ``"module:attribute"``, imported on first use. The tables live next
#: to the code they name (one registry: the names are those tables' keys). RoDA side: the alignment losses of
#: Tab. 1/4 (``"ttt++"`` = moment matching, ``"ttac"`` = Gaussian KL; ``"patchcore"``, no adaptation, is no
#: loss). DPDL side: DPDL and the open-set baselines, name -> model class.
METHOD_TABLES = {
    "alignment": "lib.roda.alignment:ALIGNMENT_LOSSES",
    "openset": "lib.dpdl.baselines:METHODS",
}


#: RoDA Table 4 (the ablation of the alignment loss), one registry for every reader: our row name -> (the paper's
#: row label, the name its runs carry in the RoDA grid). Two rows are runs the grid holds under their own names
#: (``patchcore`` is "no alignment"; ``roda``, the literal RoDA with its augmentation, is the last row); the others
#: are ablation-only methods (:data:`TABLE4_ABLATION`). Each row's spec is ``TABLE4`` of
#: lib/experiments/profile_table.py; lib.reporting.protocol_tables lays the grid's runs out under these labels.
TABLE4_ROWS = {
    "no_alignment": ("no alignment", "patchcore"),
    "kl": ("KL-Div.", "t4_kl"),
    "moment_matching": ("Moment Matching", "t4_moment_matching"),
    "ot_hungarian": ("OT + Hungarian", "t4_ot_hungarian"),
    "ot_continuous": ("OT + continuous", "t4_ot_continuous"),
    "ot_discrete": ("OT + discrete", "t4_ot_discrete"),
    "ot_discrete_copy": ("OT + discrete + direct copy", "t4_ot_discrete_copy"),
    "ot_discrete_augment": ("OT + discrete + data augment. (RoDA)", "roda"),
}
#: the grid's methods that exist only as Table 4 rows (they stay out of Tables 1 and 3)
TABLE4_ABLATION = tuple(grid for _, grid in TABLE4_ROWS.values() if grid not in ("patchcore", "roda"))


def methods(side: str) -> dict:
    """name -> callable of every method of ``side`` (``"alignment"`` or ``"openset"``)."""
    if side not in METHOD_TABLES:
        raise unknown("method side", side, METHOD_TABLES)
    return dict(_resolve(METHOD_TABLES[side]))


def method(name: str, side: str):
    """The callable behind a method name (its module is imported on first use: no import cycle at load)."""
    table = methods(side)
    if name not in table:
        raise unknown(f"{side} method", name, table)
    return table[name]


def method_path(name: str, side: str) -> str:
    """Where a method lives, ``"module:attribute"`` (for messages and docs)."""
    fn = method(name, side)
    return f"{fn.__module__}:{fn.__qualname__}"


def _resolve(path: str):
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)
