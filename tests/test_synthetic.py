"""lib.common.synthetic: MVTec-layout and labelled-folder data sets, deterministic, atomic, idempotent."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.common.synthetic import MARKER, make_synthetic_labelled, make_synthetic_mvtec

SMALL = dict(n_train=4, n_test_good=3, n_test_defect=4, size=64)


def load(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_mvtec_layout(tmp_path):
    root = make_synthetic_mvtec(tmp_path / "mvtec", category="tiles", **SMALL)
    assert root == tmp_path / "mvtec"
    cat = root / "tiles"
    assert sorted(p.name for p in (cat / "test").iterdir()) == ["good", "scratch", "spot"]
    assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == ["scratch", "spot"]
    assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png", "003.png"]
    assert len(list((cat / "test" / "good").glob("*.png"))) == 3
    assert [len(list((cat / "test" / d).glob("*.png"))) for d in ("scratch", "spot")] == [2, 2]
    assert not (cat / "train" / "bad").exists() and not (cat / "ground_truth" / "good").exists()

    for image_path in sorted(cat.glob("t*/*/*.png")):
        image = load(image_path)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        defect = image_path.parent.name
        mask_path = cat / "ground_truth" / defect / f"{image_path.stem}_mask.png"
        if defect == "good":
            assert not mask_path.exists()
            continue
        mask = load(mask_path)
        assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
        inside, outside = image[mask > 0].astype(float), image[mask == 0].astype(float)
        assert np.abs(inside.mean(axis=0) - outside.mean(axis=0)).max() > 40, "defect must be visible"
        ys, xs = np.nonzero(mask)
        assert ys.min() >= 4 and xs.min() >= 4 and ys.max() < 60 and xs.max() < 60  # survives a center crop
    # no stray temporary folders
    assert [p.name for p in root.iterdir()] == ["tiles"]


def test_mvtec_deterministic(tmp_path):
    a = tree(make_synthetic_mvtec(tmp_path / "a", **SMALL) / "synthetic")
    b = tree(make_synthetic_mvtec(tmp_path / "b", **SMALL) / "synthetic")
    c = tree(make_synthetic_mvtec(tmp_path / "c", seed=1, **SMALL) / "synthetic")
    assert a == b
    assert a.keys() == c.keys() and a["train/good/000.png"] != c["train/good/000.png"]
    # normals differ from each other (per-image randomness) but look alike
    x0, x1 = load(tmp_path / "a/synthetic/train/good/000.png"), load(tmp_path / "a/synthetic/train/good/001.png")
    assert not np.array_equal(x0, x1)
    assert np.abs(x0.mean((0, 1)) - x1.mean((0, 1))).max() < 15


def test_mvtec_idempotent_and_atomic(tmp_path):
    root = make_synthetic_mvtec(tmp_path, **SMALL)
    first = root / "synthetic" / "train" / "good" / "000.png"
    stamp = first.stat().st_mtime_ns
    make_synthetic_mvtec(tmp_path, **SMALL)
    assert first.stat().st_mtime_ns == stamp, "a complete set must not be rewritten"
    # other arguments replace our own folder
    make_synthetic_mvtec(tmp_path, **{**SMALL, "n_train": 2})
    assert len(list((root / "synthetic" / "train" / "good").glob("*.png"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]
    # but a folder that is not ours is never touched
    foreign = tmp_path / "other" / "synthetic"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="remove it or choose another root"):
        make_synthetic_mvtec(tmp_path / "other", **SMALL)
    assert (foreign / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["synthetic"]


def test_labelled(tmp_path):
    root = make_synthetic_labelled(tmp_path / "lab", n_normal=5, n_per_defect=2, size=48)
    assert (root / MARKER).exists()
    with open(root / "labels.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["image", "label", "defect", "mask"]
        rows = list(reader)
    assert len(rows) == 5 + 4 * 2
    assert len({r["defect"] for r in rows if r["label"] == "1"}) >= 3
    for row in rows:
        image = load(root / row["image"])
        assert image.shape == (48, 48, 3)
        if row["label"] == "0":
            assert row["defect"] == "good" and row["mask"] == ""
        else:
            assert row["label"] == "1" and row["defect"] != "good"
            mask = load(root / row["mask"])
            assert mask.shape == (48, 48) and mask.max() == 255 and set(np.unique(mask)) <= {0, 255}
    again = tmp_path / "lab2"
    assert tree(make_synthetic_labelled(again, n_normal=5, n_per_defect=2, size=48)) == tree(root)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown defect"):
        make_synthetic_mvtec(tmp_path, defects=("scratch", "dent"), **SMALL)
    with pytest.raises(ValueError, match="32 px"):
        make_synthetic_labelled(tmp_path / "x", size=16)
