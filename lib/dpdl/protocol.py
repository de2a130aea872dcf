"""The open-set supervised anomaly-detection (OSAD) protocol of DRA, AHL and DPDL.

A run trains on all training normals plus ``M`` *seen* anomalies and is tested on the test normals plus the
anomalies that were *not* seen. Two settings (DRA ``datasets/mvtecad.py``; DPDL Sec. 5.1):

- **general**: the ``M`` seen anomalies are drawn from all anomaly classes (M = 10 and M = 1 in the papers);
  the other anomalies of every class are tested.
- **hard**: the ``M`` seen anomalies are drawn from *one* class (``seen_class``); the test set holds the test
  normals and the anomalies of the *other* classes only (unseen-class detection). Datasets with a single
  anomaly class have no hard setting.

Datasets without a train/test split (labelled folders, ELPV) split their normals 75/25 into train/test with a
fixed ``normal_split_seed`` (DRA uses ``random_state=42``); every anomaly goes to the candidate pool. MVTec AD
keeps its own split (``train/good`` for training, ``test/*`` for the rest).

Determinism, fixing DRA's bug (it shuffles the unsorted ``os.listdir`` order): every list of samples is sorted by
``(path, box)`` before any seeded shuffle, so a split depends on the seed alone, never on the order in which the
files were listed. KolektorSDD ("SDD") is cut into vertical thirds, each labelled by the mask pixels inside it
(:func:`kolektor_thirds`), before the normals are split.

Errors name the fix: too few anomalies for ``M``, a hard-setting class that does not exist, an anomalous SDD
image without a mask. Missing files in ``labels.csv`` are reported by :func:`lib.common.data.labelled_folder_samples`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from lib.common import registry
from lib.common.data import (
    DataError,
    Sample,
    Task,
    labelled_folder_samples,
    mvtec_samples,
    split_normals,
)
from lib.common.elpv import elpv_samples

__all__ = [
    "OpenSetSplit",
    "SETTINGS",
    "aggregate_runs",
    "anomaly_classes",
    "hard_setting_classes",
    "kolektor_thirds",
    "load_openset_task",
    "make_split",
    "sample_sort_key",
    "sorted_samples",
    "split_plan",
]

SETTINGS = ("general", "hard")


def sample_sort_key(sample: Sample):
    """The key every list is sorted by before a seeded shuffle: (path, box)."""
    return (str(sample.path), tuple(sample.box) if sample.box is not None else ())


def sorted_samples(samples: Iterable[Sample]) -> list[Sample]:
    return sorted(samples, key=sample_sort_key)


def anomaly_classes(samples: Iterable[Sample]) -> list[str]:
    """Sorted anomaly classes (``defect`` of the anomalous samples)."""
    return sorted({s.defect for s in samples if s.label == 1})


@dataclass(frozen=True)
class OpenSetSplit:
    """One open-set run's data: training normals, the seen anomalies, and the test set.

    ``test`` holds the test normals and the unseen anomalies (general: every anomaly that was not drawn;
    hard: the anomalies of the other classes). ``seen_class`` is None in the general setting.
    """

    name: str
    setting: str
    n_anomalies: int
    seed: int
    train_normal: tuple[Sample, ...]
    train_anomaly: tuple[Sample, ...]
    test: tuple[Sample, ...]
    seen_class: str | None = None
    geometry: dict = field(default_factory=lambda: dict(resize=256, crop=224))

    @property
    def test_labels(self) -> np.ndarray:
        return np.array([s.label for s in self.test], dtype=int)

    def summary(self) -> dict:
        """Counts for the protocol table of the notebook."""
        test_anom = [s for s in self.test if s.label == 1]
        return dict(
            task=self.name,
            setting=self.setting,
            seen_class=self.seen_class or "all",
            n_anomalies=self.n_anomalies,
            seed=self.seed,
            train_normal=len(self.train_normal),
            train_anomaly=len(self.train_anomaly),
            seen_classes=",".join(sorted({s.defect for s in self.train_anomaly})),
            test_normal=len(self.test) - len(test_anom),
            test_anomaly=len(test_anom),
            test_classes=",".join(anomaly_classes(self.test)),
        )


def _draw(pool: Sequence[Sample], n: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(drawn, rest): ``n`` samples of the sorted ``pool`` by a seeded permutation; both lists sorted."""
    pool = sorted_samples(pool)
    order = np.random.default_rng(seed).permutation(len(pool))
    drawn = sorted_samples(pool[i] for i in order[:n])
    rest = sorted_samples(pool[i] for i in order[n:])
    return drawn, rest


def make_split(
    train_normal: Sequence[Sample],
    test: Sequence[Sample],
    n_anomalies: int = 10,
    seed: int = 0,
    setting: str = "general",
    seen_class: str | None = None,
    name: str = "dataset",
    geometry: dict | None = None,
) -> OpenSetSplit:
    """Draw the ``n_anomalies`` seen anomalies from the anomalies of ``test`` and remove them from the test set.

    ``train_normal`` are the training normals, ``test`` the labelled test pool (normals and anomalies), e.g.
    a :class:`lib.common.data.Task`'s ``train`` and ``test``. The result depends only on the *set* of samples, the
    seed and the setting: inputs are sorted before the seeded draw.
    """
    if setting not in SETTINGS:
        raise DataError(f"setting must be one of {SETTINGS}, got {setting!r}")
    n_anomalies = int(n_anomalies)
    if n_anomalies < 1:
        raise DataError(f"n_anomalies must be at least 1 (the open-set protocol trains on seen anomalies), "
                        f"got {n_anomalies}")
    train_normal = sorted_samples(train_normal)
    if any(s.label != 0 for s in train_normal):
        raise DataError(f"{name}: the training normals contain anomalous samples; pass normals only as train_normal")
    if not train_normal:
        raise DataError(f"{name} has no training normals: check the data root / the normal split")
    test = sorted_samples(test)
    normals = [s for s in test if s.label == 0]
    anomalies = [s for s in test if s.label == 1]
    classes = anomaly_classes(anomalies)
    if setting == "general":
        if seen_class is not None:
            raise DataError("seen_class applies to the hard setting only: pass setting='hard' or drop seen_class")
        if len(anomalies) < n_anomalies + 1:
            raise DataError(
                f"dataset {name} has {len(anomalies)} anomalies, M={n_anomalies} needs at least {n_anomalies + 1} "
                f"({n_anomalies} seen for training and at least 1 unseen left to test): lower n_anomalies"
            )
        seen, unseen = _draw(anomalies, n_anomalies, seed)
    else:
        if len(classes) < 2:
            raise DataError(
                f"dataset {name} has {len(classes)} anomaly class(es) {classes}: the hard setting needs at least 2 "
                "(one seen, the others tested); use setting='general' for this dataset"
            )
        if seen_class is None:
            raise DataError(f"the hard setting needs seen_class=, one of the anomaly classes of {name}: {classes}")
        if seen_class not in classes:
            raise DataError(
                f"seen class {seen_class!r} does not exist in dataset {name}: its anomaly classes are {classes}"
            )
        pool = [s for s in anomalies if s.defect == seen_class]
        if len(pool) < n_anomalies:
            raise DataError(
                f"class {seen_class!r} of dataset {name} has {len(pool)} anomalies, M={n_anomalies} needs at least "
                f"{n_anomalies}: lower n_anomalies (or pick a larger class: {hard_setting_classes(test, 1)})"
            )
        seen, _ = _draw(pool, n_anomalies, seed)
        # hard setting: the seen class leaves the test set entirely (its unseen members too)
        unseen = [s for s in anomalies if s.defect != seen_class]
    return OpenSetSplit(
        name=name,
        setting=setting,
        n_anomalies=n_anomalies,
        seed=int(seed),
        train_normal=tuple(train_normal),
        train_anomaly=tuple(seen),
        test=tuple(sorted_samples(normals + list(unseen))),
        seen_class=seen_class if setting == "hard" else None,
        geometry=dict(geometry or dict(resize=256, crop=224)),
    )


def hard_setting_classes(samples: Iterable[Sample], n_anomalies: int = 1) -> list[str]:
    """Anomaly classes with at least ``n_anomalies`` members (candidates for the hard setting's seen class)."""
    samples = list(samples)
    counts = pd.Series([s.defect for s in samples if s.label == 1], dtype=object).value_counts()
    return sorted(c for c, n in counts.items() if n >= n_anomalies)


def split_plan(task: Task, settings=("general",), n_anomalies=(10, 1), seeds=(0, 1, 2, 3, 4),
               seen_classes=None) -> list[OpenSetSplit]:
    """Every split of a benchmark: settings x M x (seen class) x seeds.

    The hard setting runs once per anomaly class (``seen_classes`` restricts them) and is skipped for
    datasets with a single anomaly class; a class with fewer than M anomalies is skipped for that M.
    """
    splits = []
    classes = anomaly_classes(task.test)
    for setting in settings:
        for m in n_anomalies:
            if setting == "general":
                for seed in seeds:
                    splits.append(make_split(task.train, task.test, m, seed, "general", name=task.name,
                                             geometry=task.geometry()))
                continue
            if len(classes) < 2:
                continue
            for cls in (seen_classes or classes):
                if cls in classes and cls not in hard_setting_classes(task.test, m):
                    continue
                for seed in seeds:
                    splits.append(make_split(task.train, task.test, m, seed, "hard", seen_class=cls, name=task.name,
                                             geometry=task.geometry()))
    return splits


# ----------------------------------------------------------------------------------------------------
# Data sets of the protocol
# ----------------------------------------------------------------------------------------------------


def kolektor_thirds(samples: Iterable[Sample], min_defect_pixels: int = 1, unmasked: str = "error") -> list[Sample]:
    """Cut every image into three vertical thirds (top, middle, bottom) labelled by its mask (DRA's SDD).

    Each third is a :class:`Sample` with ``box=(0, top, width, bottom)``; it is anomalous when at least
    ``min_defect_pixels`` mask pixels (> 127) fall inside the box, otherwise normal (``defect="good"``,
    ``mask=None``). Normal images give three normal thirds. An anomalous image without a mask cannot be
    labelled per third: ``unmasked="error"`` (default) raises, ``"drop"`` skips it, ``"keep"`` labels all
    three thirds anomalous.
    """
    from PIL import Image

    if unmasked not in ("error", "drop", "keep"):
        raise DataError(f"unmasked must be 'error', 'drop' or 'keep', got {unmasked!r}")
    out = []
    for s in sorted_samples(samples):
        if s.box is not None:
            raise DataError(f"{s.path} already has a box {s.box}: cut whole images into thirds only")
        with Image.open(s.path) as im:
            width, height = im.size
        if height < 3:
            raise DataError(f"{s.path} is {width}x{height} px: too small to cut into thirds")
        cuts = [round(i * height / 3) for i in range(4)]
        boxes = [(0, cuts[i], width, cuts[i + 1]) for i in range(3)]
        if s.label == 0:
            out += [replace(s, box=b, mask=None, defect="good") for b in boxes]
            continue
        if not s.mask:
            if unmasked == "drop":
                continue
            if unmasked == "keep":
                out += [replace(s, box=b) for b in boxes]
                continue
            raise DataError(
                f"anomalous image {s.path} has no mask, so its thirds cannot be labelled: add its mask to "
                "labels.csv, or pass unmasked='drop' (skip it) or 'keep' (all thirds anomalous)"
            )
        with Image.open(s.mask) as m:
            mask = np.asarray(m.convert("L")) > 127
        if mask.shape != (height, width):
            raise DataError(f"mask {s.mask} is {mask.shape[1]}x{mask.shape[0]} but image {s.path} is {width}x{height}")
        for b in boxes:
            hit = int(mask[b[1]:b[3], :].sum()) >= min_defect_pixels
            out.append(replace(s, box=b) if hit else replace(s, box=b, label=0, defect="good", mask=None))
    return sorted_samples(out)


def _labelled_root(data_root, name: str) -> Path:
    if data_root is None:
        raise DataError(f"task {name!r} needs data_root= (a folder holding {name}/labels.csv)")
    root = Path(data_root).expanduser()
    if (root / name / "labels.csv").exists():
        return root / name
    if (root / "labels.csv").exists():
        return root
    raise DataError(f"no labels.csv for task {name!r} under {root}: expected {root / name / 'labels.csv'}")


def load_openset_task(name: str, data_root=None, normal_split_seed: int = 42, image_size: int = 224,
                      normal_fraction: float = 0.75) -> Task:
    """Training normals and the labelled test pool of a dataset, at the protocol's geometry.

    ``name``: ``"elpv"`` (the embedded default), ``"mvtec/<category>"`` (``data_root`` holds the category or an
    ``mvtec/`` folder), ``"ksdd_thirds"`` (the ``ksdd/`` labelled folder cut into thirds),
    ``"synthetic_labelled"`` (generated under ``data_root``), or any labelled folder (``headct``, ``brainmri``,
    ...). Normals of datasets without a split are split ``normal_fraction``/rest with ``normal_split_seed``
    (DRA: 0.75, 42), after sorting.

    Geometry: images are resized to ``image_size`` x ``image_size`` without a crop, as DRA/DevNet do
    (``Resize((448, 448))``; the aspect ratio is not kept).
    """
    geometry = dict(resize=(int(image_size), int(image_size)), crop=None)
    if name.startswith("mvtec/"):
        category = name.split("/", 1)[1]
        root = Path(data_root).expanduser() if data_root is not None else None
        if root is not None and (root / "mvtec" / category).is_dir():
            root = root / "mvtec"
        train = mvtec_samples(root, category, "train")
        test = mvtec_samples(root, category, "test")
        return Task(name, tuple(sorted_samples(train)), tuple(sorted_samples(test)), **geometry)
    if name == "elpv":
        samples = elpv_samples()
    elif name == "synthetic_labelled":
        from lib.common.synthetic import make_synthetic_labelled

        if data_root is None:
            raise DataError("task 'synthetic_labelled' needs data_root= (where the generated set is written)")
        samples = labelled_folder_samples(make_synthetic_labelled(Path(data_root) / "synthetic_labelled"))
    else:
        # a registered name is checked against the protocol ("ksdd" is the RoDA side's whole strips: the
        # open-set SDD is "ksdd_thirds", whose folder is ksdd/); other names are labelled folders by path or name
        spec = registry.task(name, protocol="openset") if name in registry.TASKS else None
        folder = spec.folder if spec is not None and spec.folder else name
        samples = labelled_folder_samples(_labelled_root(data_root, folder))
        if spec is not None and spec.thirds:
            samples = kolektor_thirds(samples)
    train, test = split_normals(sorted_samples(samples), normal_fraction, normal_split_seed)
    return Task(name, tuple(sorted_samples(train)), tuple(sorted_samples(test)), **geometry)


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------


def aggregate_runs(df: pd.DataFrame, by, value: str = "auroc", digits: int = 3, ddof: int = 1) -> pd.DataFrame:
    """Mean +- std of ``value`` over seeds per group ``by``, with a ``mean ± std`` text column.

    ``ddof=1`` is the sample standard deviation (pandas' default); pass ``ddof=0`` for numpy's population std.
    NaN values (e.g. a test set without anomalies) are left out and counted in ``n_nan``.
    """
    by = [by] if isinstance(by, str) else list(by)
    g = df.groupby(by, sort=False, dropna=False)[value]
    out = g.agg(mean="mean", std=lambda v: float(np.nanstd(v.to_numpy(dtype=float), ddof=ddof))
                if v.notna().sum() > ddof else 0.0, n="count").reset_index()
    out["n_nan"] = g.apply(lambda v: int(v.isna().sum())).to_numpy()
    out["text"] = [f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"
                   for m, s, n in zip(out["mean"], out["std"], out["n"])]
    return out
