"""The open-set protocol: deterministic splits, seen anomalies out of the test set, hard setting, clear errors."""

import random

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.common.data import DataError, Sample, Task
from lib.dpdl.protocol import (
    aggregate_runs,
    anomaly_classes,
    kolektor_thirds,
    load_openset_task,
    make_split,
    split_plan,
)


def _pool(n_normal=12, per_class=(("scratch", 6), ("spot", 5), ("crack", 4))):
    normals = [Sample(f"/data/good_{i:03d}.png", 0, "good") for i in range(n_normal)]
    anomalies = [Sample(f"/data/{c}_{i:03d}.png", 1, c) for c, n in per_class for i in range(n)]
    return normals, anomalies


def _paths(samples):
    return [s.path for s in samples]


def test_split_is_deterministic_regardless_of_input_order():
    normals, anomalies = _pool()
    train, test = normals[:8], normals[8:] + anomalies
    a = make_split(train, test, n_anomalies=5, seed=3)
    shuffled_train, shuffled_test = train[:], test[:]
    random.Random(0).shuffle(shuffled_train)
    random.Random(1).shuffle(shuffled_test)
    b = make_split(shuffled_train, shuffled_test, n_anomalies=5, seed=3)
    assert _paths(a.train_anomaly) == _paths(b.train_anomaly)
    assert _paths(a.test) == _paths(b.test) and _paths(a.train_normal) == _paths(b.train_normal)
    draws = {tuple(_paths(make_split(train, test, 5, seed=s).train_anomaly)) for s in range(5)}
    assert len(draws) > 1, "different seeds must draw different seen anomalies"


def test_general_setting_removes_seen_anomalies_from_test():
    normals, anomalies = _pool()
    split = make_split(normals[:8], normals[8:] + anomalies, n_anomalies=10, seed=0)
    seen, test = set(split.train_anomaly), set(split.test)
    assert len(seen) == 10 and not seen & test
    assert seen | {s for s in test if s.label == 1} == set(anomalies)
    assert {s for s in test if s.label == 0} == set(normals[8:])
    assert len({s.defect for s in split.train_anomaly}) > 1  # drawn from all classes
    one = make_split(normals[:8], normals[8:] + anomalies, n_anomalies=1, seed=0)
    assert len(one.train_anomaly) == 1 and one.summary()["test_anomaly"] == len(anomalies) - 1


def test_hard_setting_trains_on_one_class_and_tests_on_the_others():
    normals, anomalies = _pool()
    split = make_split(normals[:8], normals[8:] + anomalies, n_anomalies=3, seed=1, setting="hard",
                       seen_class="scratch")
    assert {s.defect for s in split.train_anomaly} == {"scratch"} and len(split.train_anomaly) == 3
    assert "scratch" not in anomaly_classes(split.test)
    assert anomaly_classes(split.test) == ["crack", "spot"]
    assert sum(s.label == 0 for s in split.test) == 4


def test_clear_errors_name_the_fix():
    normals, anomalies = _pool(per_class=(("scratch", 3),))
    with pytest.raises(DataError, match=r"has 3 anomalies, M=10 needs at least 11.*lower n_anomalies"):
        make_split(normals[:8], normals[8:] + anomalies, n_anomalies=10, seed=0, name="toy")
    normals, anomalies = _pool()
    with pytest.raises(DataError, match=r"'dent' does not exist.*\['crack', 'scratch', 'spot'\]"):
        make_split(normals[:8], normals[8:] + anomalies, 1, 0, setting="hard", seen_class="dent")
    with pytest.raises(DataError, match="lower n_anomalies"):
        make_split(normals[:8], normals[8:] + anomalies, 5, 0, setting="hard", seen_class="crack")
    one_class = [s for s in anomalies if s.defect == "spot"]
    with pytest.raises(DataError, match="use setting='general'"):
        make_split(normals[:8], normals[8:] + one_class, 1, 0, setting="hard", seen_class="spot")


def test_labels_csv_with_missing_files_is_a_clear_error(tmp_path):
    root = tmp_path / "mydata"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(root / "images" / "a.png")
    (root / "labels.csv").write_text("image,label,defect,mask\nimages/a.png,0,good,\nimages/gone.png,1,crack,\n")
    with pytest.raises(DataError, match=r"missing files.*gone\.png.*fix the paths"):
        load_openset_task("mydata", tmp_path)


def test_kolektor_thirds_are_labelled_by_their_mask(tmp_path):
    Image.new("RGB", (30, 90)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 90)).save(tmp_path / "n.png")
    mask = np.zeros((90, 30), np.uint8)
    mask[40:45, 10:20] = 255  # defect in the middle third (rows 30..60)
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    thirds = kolektor_thirds([Sample(str(tmp_path / "n.png"), 0), Sample(str(tmp_path / "a.png"), 1, "crack",
                                                                           str(tmp_path / "a_mask.png"))])
    a = [t for t in thirds if t.path.endswith("a.png")]
    assert [t.box for t in a] == [(0, 0, 30, 30), (0, 30, 30, 60), (0, 60, 30, 90)]
    assert [t.label for t in a] == [0, 1, 0] and a[1].mask and a[0].mask is None
    assert [t.label for t in thirds if t.path.endswith("n.png")] == [0, 0, 0]
    with pytest.raises(DataError, match="has no mask"):
        kolektor_thirds([Sample(str(tmp_path / "a.png"), 1, "crack")])


def test_labelled_task_splits_normals_75_25_and_plan(tmp_path):
    from lib.common.synthetic import make_synthetic_labelled

    make_synthetic_labelled(tmp_path / "mini", n_normal=8, n_per_defect=2, size=32)
    task = load_openset_task("mini", tmp_path, image_size=64)
    assert isinstance(task, Task) and task.geometry() == dict(resize=(64, 64), crop=None)
    assert len(task.train) == 6 and all(s.label == 0 for s in task.train)
    assert sum(s.label == 0 for s in task.test) == 2 and sum(s.label == 1 for s in task.test) == 8
    plan = split_plan(task, settings=("general", "hard"), n_anomalies=(2, 1), seeds=(0, 1))
    general = [s for s in plan if s.setting == "general"]
    hard = [s for s in plan if s.setting == "hard"]
    assert len(general) == 4 and len(hard) == 4 * 2 * 2 - 0  # 4 classes x 2 M x 2 seeds (2 per class >= M)
    assert all(s.seen_class not in anomaly_classes(s.test) for s in hard)


def test_aggregate_runs_mean_std():
    df = pd.DataFrame(dict(method=["a"] * 3 + ["b"] * 2, auroc=[0.8, 0.9, 1.0, 0.5, np.nan]))
    out = aggregate_runs(df, "method").set_index("method")
    assert out.loc["a", "mean"] == pytest.approx(0.9) and out.loc["a", "std"] == pytest.approx(0.1)
    assert out.loc["a", "text"] == "0.900 ± 0.100"
    assert out.loc["b", "n"] == 1 and out.loc["b", "n_nan"] == 1 and out.loc["b", "text"] == "0.500"
