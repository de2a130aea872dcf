import math

import numpy as np
import pandas as pd
import pytest

from lib.common.metrics import image_auroc, mean_std, pixel_auroc, shortcut_auroc


def test_separable_case_is_perfect_and_reversed_is_zero():
    labels = [0, 0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert image_auroc(labels, [0.9, 0.8, 0.7, 0.1, 0.2]) == 0.0
    assert image_auroc(labels, [0.5] * 5) == 0.5


def test_single_class_gives_nan_and_nan_scores_raise():
    assert math.isnan(image_auroc([0, 0], [0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])


def test_pixel_auroc_on_a_known_map_and_subsampling():
    masks = np.zeros((2, 32, 32), bool)
    masks[1, 8:16, 8:16] = True
    maps = masks.astype(np.float32) + 0.01 * np.random.default_rng(0).random(masks.shape)
    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_auroc(masks, maps, max_pixels=500) == 1.0
    assert math.isnan(pixel_auroc(np.zeros_like(masks), maps))


def test_mean_std_formats_seeds():
    df = pd.DataFrame(dict(method=["a", "a", "b"], value=[0.8, 0.9, 0.5]))
    out = mean_std(df, "method").set_index("method")
    assert out.loc["a", "mean"] == pytest.approx(0.85)
    assert out.loc["a", "text"] == "85.0 ± 7.1"
    assert out.loc["b", "text"] == "50.0"


def test_shortcut_auroc_folds_both_directions():
    labels = [0, 0, 0, 1, 1, 1]
    darker_normals = [0.40, 0.41, 0.42, 0.60, 0.61, 0.62]  # the statistic separates the classes ...
    assert shortcut_auroc(labels, darker_normals) == 1.0
    assert shortcut_auroc(labels, [-v for v in darker_normals]) == 1.0  # ... in either direction
    assert shortcut_auroc(labels, [0.5, 0.6, 0.4, 0.6, 0.5, 0.4]) == 0.5  # no information: chance
