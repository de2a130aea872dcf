"""RoDA's tables in the paper's layout and the decomposition of its parts, on small tables with known answers."""

import itertools

import numpy as np
import pandas as pd
import pytest

from lib.reporting.protocol_tables import (
    backbone_effects,
    decomposition,
    paper_layout,
    severity_curve,
    table4_layout,
)

CORRUPTIONS = ("noise", "blur")


def _grid(method, value, stage="native"):
    """value(task, condition, seed) -> AUROC, for 2 tasks x 2 corruptions x 2 seeds."""
    return [dict(task=t, method=method, condition=c, seed=s, severity=5, stage=stage,
                 image_auroc=value(t, c, s), pixel_auroc=value(t, c, s) / 2)
            for t in ("a", "b") for c in CORRUPTIONS for s in (0, 1)]


def test_paper_layout_means_spreads_and_the_papers_number_beside():
    # task a: 0.6 / 0.8 over the seeds (mean 0.7), task b: 0.9 flat; the working rows must not enter
    value = {("a", 0): 0.6, ("a", 1): 0.8, ("b", 0): 0.9, ("b", 1): 0.9}
    table = pd.DataFrame(_grid("patchcore", lambda t, c, s: value[t, s])
                         + _grid("patchcore", lambda t, c, s: 0.1, stage="working"))
    paper = pd.DataFrame([dict(paper="roda", table="Table 1", dataset="MVTec", metric="image_auroc",
                               method="PatchCore", setting="noise", value=80.2)])
    out = paper_layout(table, paper, "image_auroc", stage="native", corruptions=CORRUPTIONS).set_index("condition")
    assert list(out.index) == ["noise", "blur", "mean"]
    assert out.loc["noise", "ours"] == pytest.approx(80.0)  # mean of 70 and 90
    assert out.loc["noise", "std_categories"] == pytest.approx(np.std([70, 90], ddof=1))
    assert out.loc["noise", "std_seeds"] == pytest.approx(np.std([60, 80], ddof=1) / 2)  # task b does not move
    assert out.loc["mean", "ours"] == pytest.approx(80.0) and (out.n_categories == 2).all() and (out.n_seeds == 2).all()
    assert out.loc["noise", "paper"] == 80.2 and "the paper's" in out.loc["noise", "paper_source"]
    assert np.isnan(out.loc["blur", "paper"]) and out.loc["blur", "paper_source"] == ""
    working = paper_layout(table, paper, "image_auroc", stage="working", corruptions=CORRUPTIONS)
    assert working.ours.to_numpy() == pytest.approx(10.0) and (working.stage == "working").all()


def test_decomposition_pairs_by_category_and_seed():
    chain = (("PatchCore", "p"), ("statistics", "q"), ("transport", "r"))
    rng = np.random.default_rng(0)
    noise = {(t, c, s): rng.normal(0, 0.05) for t in "ab" for c in CORRUPTIONS for s in (0, 1)}
    table = pd.DataFrame(_grid("p", lambda t, c, s: 0.5 + noise[t, c, s])  # paired: the noise cancels
                         + _grid("q", lambda t, c, s: 0.6 + noise[t, c, s])
                         + _grid("r", lambda t, c, s: 0.6 + noise[t, c, s] + (0.1 if t == "a" else -0.1))
                         + _grid("q", lambda t, c, s: 0.0, stage="working"))
    out = decomposition(table, chain=chain, corruptions=CORRUPTIONS, n_boot=500)
    step = out[(out.metric == "image_auroc") & (out.condition == "mean")].set_index("step")
    assert step.loc["statistics", "effect"] == pytest.approx(10.0)
    assert step.loc["statistics", "ci_low"] == pytest.approx(10.0) == step.loc["statistics", "ci_high"]
    assert step.loc["statistics", "n_pairs"] == 4  # 2 categories x 2 seeds
    assert step.loc["transport", "effect"] == pytest.approx(0.0, abs=1e-9)
    assert step.loc["transport", "ci_low"] < 0 < step.loc["transport", "ci_high"]  # +10 / -10 by category
    # two categories are the units (k = 2): the interval is wide, t(1) x the bootstrap's se, and p large
    assert step.loc["transport", "ci_high"] > 50 and step.loc["transport", "p"] > 0.5
    assert step.loc["statistics", "n_categories"] == 2
    pixel = out[(out.metric == "pixel_auroc") & (out.condition == "noise")].set_index("step")
    assert pixel.loc["statistics", "effect"] == pytest.approx(5.0)
    assert (out.stage == "native").all()


def test_backbone_effects_compare_encoders_on_the_same_cells():
    """Known effects: RoDA 10 points below PatchCore on encoder a, 2 below on b (every cell), so b - a is +8; a cell
    only encoder a ran (another seed) and a working-stage row are left out of every number."""
    rows = []
    for backbone, gap in (("a", 0.10), ("b", 0.02)):
        for task, seed, c in itertools.product(("t1", "t2"), (0, 1), CORRUPTIONS):
            base = 0.8 + 0.01 * seed + (0.05 if task == "t2" else 0)
            rows += [dict(task=task, backbone=backbone, method="patchcore", condition=c, seed=seed, severity=5,
                          stage="native", image_auroc=base, pixel_auroc=base),
                     dict(task=task, backbone=backbone, method="roda", condition=c, seed=seed, severity=5,
                          stage="native", image_auroc=base - gap, pixel_auroc=base - gap)]
    for backbone in ("a", "b"):  # seed 3 of t2 under one corruption only: in its corruption's row, not in the mean
        rows += [dict(task="t2", backbone=backbone, method=m, condition="noise", seed=3, severity=5, stage="native",
                      image_auroc=v, pixel_auroc=v) for m, v in (("patchcore", 0.2), ("roda", 0.9))]
    for c in CORRUPTIONS:  # encoder a alone on seed 2; a working-stage row far off
        rows += [dict(task="t1", backbone="a", method=m, condition=c, seed=2, severity=5, stage="native",
                      image_auroc=v, pixel_auroc=v) for m, v in (("patchcore", 0.9), ("roda", 0.1))]
    rows.append(dict(task="t1", backbone="b", method="roda", condition="blur", seed=0, severity=5,
                     stage="working", image_auroc=0.0, pixel_auroc=0.0))
    out = backbone_effects(pd.DataFrame(rows), corruptions=CORRUPTIONS, n_boot=200)
    mean = out[(out.condition == "mean") & (out.metric == "pixel_auroc")].set_index("backbone")
    assert mean.loc["a", "effect"] == pytest.approx(-10) and mean.loc["b", "effect"] == pytest.approx(-2)
    assert mean.loc["b - a", "effect"] == pytest.approx(8) and np.isnan(mean.loc["b - a", "method_mean"])
    assert set(mean.n_pairs) == {4} and set(mean.n_categories) == {2} and set(mean.n_seeds) == {2}
    assert mean.loc["a", "reference_mean"] == pytest.approx(100 * np.mean([0.8, 0.81, 0.85, 0.86]))
    assert mean.loc["a", "method_mean"] - mean.loc["a", "reference_mean"] == pytest.approx(-10)
    noise = out[(out.condition == "noise") & (out.metric == "pixel_auroc")].set_index("backbone")
    assert noise.loc["a", "n_pairs"] == 5 and noise.loc["b - a", "effect"] == pytest.approx((8 + 16 / 3) / 2)
    per = out[(out.condition == "blur") & (out.backbone == "b - a")]
    assert len(per) == 2 and per.effect.tolist() == pytest.approx([8, 8])
    flipped = backbone_effects(pd.DataFrame(rows), base="b", corruptions=CORRUPTIONS, n_boot=200)
    assert flipped.set_index(["backbone", "metric", "condition"]).loc[("a - b", "image_auroc", "mean"), "effect"] \
        == pytest.approx(-8)  # the base encoder first: the others are read against it


def test_severity_curve_reads_the_same_categories_at_every_point():
    """Fig. 5b with known values: AUROC 0.9 - 0.1 x severity for PatchCore, 0.05 higher for RoDA, on two
    categories x two seeds; a seed that ran only severity 5 (far off), another corruption, a working-stage row and a
    third method are left out of every point."""
    rows = [dict(task=t, method=m, condition="gaussian_noise", seed=s, severity=k, stage="native",
                 image_auroc=0.9 - 0.1 * k + (0.05 if m == "roda" else 0) + (0.02 if t == "b" else 0),
                 pixel_auroc=0.5)
            for t in ("a", "b") for s in (0, 1) for k in (1, 3, 5) for m in ("patchcore", "roda")]
    rows += [dict(task="a", method=m, condition="gaussian_noise", seed=7, severity=5, stage="native",
                  image_auroc=0.0, pixel_auroc=0.0) for m in ("patchcore", "roda")]
    rows += [dict(task="a", method="patchcore", condition="contrast", seed=0, severity=1, stage="native",
                  image_auroc=0.0, pixel_auroc=0.0),
             dict(task="a", method="patchcore", condition="gaussian_noise", seed=0, severity=1, stage="working",
                  image_auroc=0.0, pixel_auroc=0.0),
             dict(task="a", method="ttac", condition="gaussian_noise", seed=0, severity=1, stage="native",
                  image_auroc=0.0, pixel_auroc=0.0)]
    out = severity_curve(pd.DataFrame(rows))
    image = out[out.metric == "image_auroc"].set_index(["method", "severity"])
    assert sorted(image.index) == [(m, k) for m in ("patchcore", "roda") for k in (1, 3, 5)]
    for (method, k), row in image.iterrows():
        assert row.ours == pytest.approx(100 * (0.9 - 0.1 * k + (0.05 if method == "roda" else 0) + 0.01))
        assert row.std_categories == pytest.approx(np.std([0, 2], ddof=1))
        assert (row.n_categories, row.n_seeds, row.n_pairs) == (2, 2, 4)
    assert out[out.metric == "pixel_auroc"].ours.to_numpy() == pytest.approx(50.0)
    assert severity_curve(pd.DataFrame(rows), stage="working").method.tolist() == ["patchcore", "patchcore"]


def test_table4_layout_reads_the_cells_every_ablation_row_ran():
    """The ablation rows ran seed 0 only; the grid's PatchCore and RoDA also seed 1 (far off): Table 4 reads seed 0
    of every row, in the paper's row order, with the paper's Table 4 number (not Table 1's) beside."""
    value = {"patchcore": 0.6, "t4_kl": 0.5, "t4_ot_discrete": 0.7, "roda": 0.8}
    table = pd.DataFrame([r for m, v in value.items() for r in _grid(m, lambda t, c, s, v=v: v if s == 0 else 0.0)
                          if m in ("patchcore", "roda") or r["seed"] == 0])
    paper = pd.DataFrame([dict(paper="roda", table=tab, dataset="MVTec", metric="image_auroc", method=m,
                               setting="noise", value=v)
                          for tab, m, v in (("Table 4", "KL-Div.", 58.99), ("Table 1", "PatchCore", 80.2),
                                            ("Table 4", "no alignment", 80.23))])
    out = table4_layout(table, paper, "image_auroc", corruptions=CORRUPTIONS)
    assert list(dict.fromkeys(out.method)) == ["patchcore", "t4_kl", "t4_ot_discrete", "roda"]
    mean = out[out.condition == "mean"].set_index("method")
    for m, v in value.items():
        assert mean.loc[m, "ours"] == pytest.approx(100 * v) and mean.loc[m, "n_seeds"] == 1
    noise = out[out.condition == "noise"].set_index("method")
    assert noise.loc["t4_kl", "paper"] == 58.99 and noise.loc["patchcore", "paper"] == 80.23
    assert "Table 4" in noise.loc["patchcore", "paper_source"] and np.isnan(noise.loc["roda", "paper"])
    assert table4_layout(table[~table.method.str.startswith("t4_")], paper).empty


def test_table4_rows_have_one_spec_and_one_grid_name_each():
    """Notebook 04's rows (profiles.TABLE4) and the registry's rows agree; a row the grid holds under its own name
    runs that method with the profile's augmentation, and every other row is a grid variant with the row's spec."""
    from lib.common.registry import TABLE4_ABLATION, TABLE4_ROWS
    from lib.experiments import profiles

    assert list(profiles.TABLE4) == list(TABLE4_ROWS)
    assert set(profiles.TABLE4_VARIANTS) == set(TABLE4_ABLATION)
    for row, (_, grid) in TABLE4_ROWS.items():
        spec = profiles.TABLE4[row]
        if grid in TABLE4_ABLATION:
            assert profiles.TABLE4_VARIANTS[grid] == spec
        else:
            assert spec["method"] == grid and spec.get("augment", "flip_rot90") == "flip_rot90"
    assert all(profiles.resolve(p).roda["augment"] == "flip_rot90" for p in ("smoke", "real_full"))


def test_grid_views_lay_the_grid_out_as_notebook_04s_tables():
    """Table 4: the grid's methods named by their rows, at severity 5, on the cells where every row ran (task b
    lacks the KL row); Fig. 5b: PatchCore and RoDA under noise on the cells with every severity (seed 1 ran
    severity 5 only), per stage; a stage with one severity has no curve."""
    from lib.reporting.protocol_tables import GRID_FIG5B, GRID_TABLE4, grid_views

    rows = [r for m in ("patchcore", "t4_kl", "roda", "ttac") for r in _grid(m, lambda t, c, s: 0.5)
            if not (m == "t4_kl" and r["task"] == "b")]
    rows += [dict(task="a", method=m, condition="noise", seed=0, severity=k, stage="native", image_auroc=0.6,
                  pixel_auroc=0.7) for m in ("patchcore", "roda") for k in (1, 3)]
    rows += [dict(r, stage="working") for r in _grid("roda", lambda t, c, s: 0.4)]
    views = grid_views(pd.DataFrame(rows), condition="noise", corruptions=CORRUPTIONS)
    t4 = views[GRID_TABLE4]
    assert set(t4.row) == {"no_alignment", "kl", "ot_discrete_augment"} and set(t4.task) == {"a"}
    assert set(t4.stage) == {"native"} and len(t4) == 3 * 2 * 2  # rows x corruptions x seeds
    curve = views[GRID_FIG5B]
    assert set(curve.seed) == {0} and sorted(curve.severity.unique()) == [1, 3, 5] and set(curve.task) == {"a"}
    assert set(curve.method) == {"patchcore", "roda"} and set(curve.stage) == {"native"}
    empty = grid_views(pd.DataFrame(_grid("patchcore", lambda t, c, s: 0.5)), corruptions=CORRUPTIONS)
    assert empty[GRID_TABLE4].empty and empty[GRID_FIG5B].empty and "row" in empty[GRID_TABLE4].columns


def test_table4_reads_a_cell_only_where_every_row_ran_every_corruption():
    """A job still running has written the KL row under noise only on seed 1: seed 1 stays out of every row."""
    rows = [r for m in ("patchcore", "t4_kl", "roda") for r in _grid(m, lambda t, c, s: 0.5 + 0.1 * s)
            if not (m == "t4_kl" and r["seed"] == 1 and r["condition"] == "blur")]
    out = table4_layout(pd.DataFrame(rows), None, "image_auroc", corruptions=CORRUPTIONS)
    assert set(out.n_seeds) == {1} and out.ours.to_numpy() == pytest.approx(50.0)
