import numpy as np
import pytest
from PIL import Image

from lib.common.data import (
    AnomalyDataset,
    DataError,
    Sample,
    labelled_folder_samples,
    load_image,
    mvtec_samples,
    preprocess,
    split_normals,
    stratified_split,
)
from lib.common.elpv import elpv_samples


def _img(path, size=(64, 48), mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * len(mode)).save(path)


@pytest.fixture
def mvtec_root(tmp_path):
    root = tmp_path / "mvtec"
    for i in range(3):
        _img(root / "cat" / "train" / "good" / f"{i:03d}.png")
    _img(root / "cat" / "test" / "good" / "000.png")
    _img(root / "cat" / "test" / "crack" / "000.png")
    _img(root / "cat" / "ground_truth" / "crack" / "000_mask.png", value=255)
    return root


def test_mvtec_layout(mvtec_root):
    train = mvtec_samples(mvtec_root, "cat", "train")
    test = mvtec_samples(mvtec_root, "cat", "test")
    assert [s.label for s in train] == [0, 0, 0]
    assert [(s.defect, s.label, s.mask is not None) for s in test] == [("crack", 1, True), ("good", 0, False)]


def test_clear_errors_for_bad_data(tmp_path, mvtec_root):
    with pytest.raises(DataError, match="does not exist"):
        mvtec_samples(tmp_path / "nope", "cat", "train")
    with pytest.raises(DataError, match="Categories there: \\['cat'\\]"):
        mvtec_samples(mvtec_root, "dog", "train")
    (mvtec_root / "flat").mkdir()
    _img(mvtec_root / "flat" / "x.png")
    with pytest.raises(DataError, match="wrong layout"):
        mvtec_samples(mvtec_root, "flat", "train")
    (mvtec_root / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        mvtec_samples(mvtec_root, "empty", "train")
    _img(tmp_path / "small.png", size=(20, 40))
    with pytest.raises(DataError, match="at least 32 px"):
        load_image(tmp_path / "small.png")
    with pytest.raises(DataError, match="empty dataset"):
        AnomalyDataset([])


def test_labelled_folder_and_missing_files(tmp_path):
    _img(tmp_path / "images" / "a.png")
    _img(tmp_path / "images" / "b.png")
    (tmp_path / "labels.csv").write_text("image,label,defect,mask\nimages/b.png,1,tumor,\nimages/a.png,0,,\n")
    s = labelled_folder_samples(tmp_path)
    assert [(p.label, p.defect) for p in s] == [(0, "good"), (1, "tumor")]  # sorted by path
    (tmp_path / "labels.csv").write_text("image,label,defect,mask\nimages/a.png,0,,\nimages/zz.png,1,x,\n")
    with pytest.raises(DataError, match="missing files.*zz.png"):
        labelled_folder_samples(tmp_path)


def test_preprocessing_geometry_gray_and_rgba(tmp_path):
    _img(tmp_path / "g.png", size=(300, 200), mode="L")
    _img(tmp_path / "m.png", size=(300, 200), mode="L", value=255)
    _img(tmp_path / "rgba.png", size=(64, 64), mode="RGBA")
    image, mask = preprocess(Sample(str(tmp_path / "g.png"), 1, "x", str(tmp_path / "m.png")), 256, 224)
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8 and mask.shape == (224, 224) and mask.all()
    assert load_image(tmp_path / "rgba.png").mode == "RGB"
    item = AnomalyDataset([Sample(str(tmp_path / "g.png"), 0)], resize=(64, 96), crop=None)[0]
    assert item["image"].shape == (3, 64, 96) and float(item["image"].max()) <= 1.0


def test_corruption_is_applied_between_resize_and_crop_and_seeded(tmp_path):
    _img(tmp_path / "g.png", size=(80, 80), mode="L")
    s = [Sample(str(tmp_path / "g.png"), 0)]
    a = AnomalyDataset(s, 64, 48, corruption="gaussian_noise", severity=5, seed=0)[0]["image"]
    b = AnomalyDataset(s, 64, 48, corruption="gaussian_noise", severity=5, seed=0)[0]["image"]
    c = AnomalyDataset(s, 64, 48, corruption="gaussian_noise", severity=5, seed=1)[0]["image"]
    clean = AnomalyDataset(s, 64, 48)[0]["image"]
    assert a.shape == (3, 48, 48) and (a == b).all() and not (a == c).all() and not (a == clean).all()


def test_stratified_split_is_deterministic_and_stratified():
    labels = np.array([0] * 40 + [1] * 60)
    a1, b1 = stratified_split(labels, 0.2, seed=3)
    a2, b2 = stratified_split(labels[::-1].copy()[::-1], 0.2, seed=3)
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    assert (labels[a1] == 0).sum() == 8 and (labels[a1] == 1).sum() == 12
    assert len(np.intersect1d(a1, b1)) == 0 and len(a1) + len(b1) == 100
    assert not np.array_equal(a1, stratified_split(labels, 0.2, seed=4)[0])
    with pytest.raises(DataError, match="empty"):
        stratified_split([], 0.2, 0)


def test_split_normals_keeps_anomalies_in_test():
    samples = [Sample(f"n{i}", 0) for i in range(8)] + [Sample(f"a{i}", 1, "x") for i in range(3)]
    train, test = split_normals(samples, 0.75, seed=42)
    assert len(train) == 6 and all(s.label == 0 for s in train)
    assert sum(s.label for s in test) == 3 and not set(train) & set(test)


def test_elpv_embedded_default():
    s = elpv_samples()
    labels = np.array([x.label for x in s])
    assert (labels == 0).sum() == 1508 and (labels == 1).sum() == 715
    assert {x.defect for x in s if x.label} == {"mono", "poly"}
