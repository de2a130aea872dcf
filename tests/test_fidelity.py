"""The paper-vs-ours fidelity logic (lib/reporting/fidelity.py, lib/reporting/effects.py) and the reference numbers
it reads: known answers on small synthetic tables."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lib.reporting import effects, result_tables
from lib.reporting import fidelity as fid
from lib.reporting.claims import MVTEC_TASKS

CONDS = ("gaussian_noise", "defocus_blur", "brightness", "contrast")
TASKS = ("mvtec/bottle", "mvtec/tire", "ksdd", "mvtec/cable")


@pytest.fixture(scope="module")
def ref():
    return fid.load_reference()


def _cells(values: dict) -> pd.Series:
    """{task: [per-seed values]} as cells indexed by (task, seed)."""
    idx = [(t, s) for t, vs in values.items() for s in range(len(vs))]
    return pd.Series([v for vs in values.values() for v in vs], index=pd.MultiIndex.from_tuples(idx,
                                                                                            names=["task", "seed"]))


def _paper_effect(ref, claim_id):
    claim = next(c for c in fid.ALL_CLAIMS if c.id == claim_id)
    return fid.paper_value(ref, claim.paper_a) - claim.scale * fid.paper_value(ref, claim.paper_b)


def _grid(effect, tasks=TASKS, seeds=(0, 1, 2), stage="native", noise=0.3, seed=0, pixel=True):
    """A RoDA grid: PatchCore at ~60 and RoDA ``effect(condition)`` points above it, per task, corruption, seed."""
    rng = np.random.default_rng(seed)
    rows = []
    for task in tasks:
        level = rng.uniform(0.55, 0.65)  # below 1 with the largest planted effect (23.6 points)
        for cond in CONDS:
            for s in seeds:
                for method, shift in (("patchcore", 0.0), ("roda", effect(cond) / 100)):
                    value = level + shift + rng.normal(0, noise / 100)
                    rows.append(dict(task=task, backbone="mobilenet_v2", method=method, condition=cond, severity=5,
                                     seed=s, image_auroc=value, pixel_auroc=value if pixel else np.nan))
    df = pd.DataFrame(rows)
    return df.assign(stage=stage) if stage else df


def _by_id(table):
    return {(r.claim_id, bool(r.counted)): r for r in table.itertuples()}


# ---------------------------------------------------------------- the effect and its interval, known answers

def test_one_category_interval_is_the_paired_t_interval():
    d = np.array([1.0, 2.5, 0.5, 3.0, 1.5, 2.0])
    s = effects.effect_interval(_cells({"t": list(d)}), n_boot=40_000)
    t = stats.ttest_1samp(d, 0.0)
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert s["estimate"] == pytest.approx(d.mean()) and s["k"] == 6 and s["n_cells"] == 6
    assert s["se"] == pytest.approx(se, rel=0.03)  # bootstrap's Monte Carlo error only
    assert s["p"] == pytest.approx(t.pvalue, rel=0.15)
    half = stats.t.ppf(0.975, 5) * s["se"]
    assert (s["low"], s["high"]) == pytest.approx((d.mean() - half, d.mean() + half))


def test_categories_are_the_unit_when_there_are_several():
    # seeds within a category agree exactly: the spread is between categories, and k is the number of categories
    means = [1.0, 4.0, 2.0, 7.0]
    s = effects.effect_interval(_cells({f"c{i}": [m] * 5 for i, m in enumerate(means)}), n_boot=40_000)
    assert s["k"] == 4 and s["n_categories"] == 4 and s["n_cells"] == 20
    assert s["estimate"] == pytest.approx(np.mean(means))
    assert s["se"] == pytest.approx(np.std(means, ddof=1) / 2, rel=0.03)
    # a category with more seeds does not weigh more: the class mean, not the cell mean
    s2 = effects.effect_interval(_cells({"a": [0.0] * 10, "b": [10.0, 10.0]}))
    assert s2["estimate"] == pytest.approx(5.0)
    # seeded: the same interval twice
    assert effects.effect_interval(_cells({"a": [1.0, 2.0], "b": [3.0, 5.0]})) == \
        effects.effect_interval(_cells({"a": [1.0, 2.0], "b": [3.0, 5.0]}))


def test_bootstrap_interval_keeps_its_level():
    rng = np.random.default_rng(0)
    # 400 experiments of 4 categories x 3 seeds with a true effect of 2: about 95% of intervals cover it
    cover = []
    for _ in range(400):
        offsets = rng.normal(0, 2, 4)
        s = effects.effect_interval(_cells({f"c{i}": list(2 + o + rng.normal(0, 1, 3)) for i, o in enumerate(offsets)}),
                                    n_boot=2000, seed=int(rng.integers(1 << 30)))
        cover.append(s["low"] <= 2 <= s["high"])
    assert 0.92 < np.mean(cover) <= 1.0


def test_one_cell_has_no_interval():
    s = effects.effect_interval(_cells({"t": [3.0]}))
    assert s["k"] == 1 and math.isnan(s["se"]) and math.isnan(s["low"]) and math.isnan(s["p"])


# ---------------------------------------------------------------- Holm and the verdict, known answers

def test_holm_on_known_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005, 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
    adjusted = effects.holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = effects.holm([0.2, np.nan, 0.01])  # NaN stays NaN and is not counted in m
    assert out[0] == pytest.approx(0.2) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert effects.holm([0.6, 0.7])[1] == 1.0 and effects.holm([0.6, 0.7])[0] == 1.0  # capped at 1


def test_verdicts_on_known_intervals():
    v = effects.verdict
    assert v(5.0, 3.0, 7.0, 0.01, paper_effect=6.0)[0] == "reproduced in size"
    assert v(15.0, 12.0, 18.0, 0.01, paper_effect=6.0)[0] == "reproduced"          # ours far larger
    assert v(-5.0, -7.0, -3.0, 0.01, paper_effect=6.0)[0] == "contradicted"
    assert v(0.5, -1.0, 2.0, 0.5, paper_effect=6.0)[0] == "not reproduced"        # rules out the paper's size
    assert v(2.0, -2.0, 8.0, 0.3, paper_effect=6.0)[0] == "inconclusive"          # covers 0 and the paper
    assert v(20.0, 11.0, 29.0, 0.2, paper_effect=6.0)[0] == "inconclusive"        # beyond the paper, Holm not
    assert v(5.0, 1.0, 9.0, 0.2, paper_effect=6.0)[0] == "inconclusive"           # significant before Holm only
    # the paper's direction is negative (TTAC below PatchCore)
    assert v(-20.0, -24.0, -16.0, 0.001, paper_effect=-21.0)[0] == "reproduced in size"
    assert v(-1.0, -5.0, 3.0, 0.6, paper_effect=-21.0)[0] == "not reproduced"
    # a claim read off a figure: a direction, no size
    assert v(3.0, 1.0, 5.0, 0.01, expect=1)[0] == "reproduced"
    assert v(3.0, -1.0, 7.0, 0.3, expect=1)[0] == "inconclusive"
    assert v(1.0, 0.0, 2.0, 0.01)[0] == "not comparable"  # no direction at all


def test_a_tiny_sample_is_inconclusive():
    # two seeds of one category, both clearly positive: a percentile bootstrap would exclude 0; t(1) does not
    s = effects.effect_interval(_cells({"t": [3.0, 6.0]}))
    assert s["low"] < 0 < 4.0 < s["high"]
    assert effects.verdict(s["estimate"], s["low"], s["high"], s["p"], paper_effect=4.0)[0] == "inconclusive"


# ---------------------------------------------------------------- the reference file

def test_reference_csv_loads_with_expected_columns(ref):
    assert set(result_tables.REFERENCE_COLUMNS) <= set(ref.columns)
    assert ref["key"].is_unique
    assert set(ref["paper"]) == {"roda", "dpdl"}
    auroc = ref[ref.metric.isin(["image_auroc", "pixel_auroc"])]
    assert len(auroc) > 1000
    assert ((auroc.value > 0) & (auroc.value <= 100)).all()
    assert set(ref.loc[ref.paper == "roda", "backbone"]) >= {"WRN-50"}
    assert set(ref.loc[ref.paper == "dpdl", "backbone"]) == {"ResNet-18"}


def test_every_roda_table1_mvtec_row_is_present(ref):
    t1 = ref[(ref.paper == "roda") & (ref.table == "Table 1") & (ref.dataset == "MVTec")]
    for method in ("PatchCore", "TTAC", "TTT++", "GNL", "RoDA"):
        for cond in ("clean", *CONDS):
            assert len(t1[(t1.method == method) & (t1.setting == cond)]) == 1, (method, cond)
    v = t1.set_index(["method", "setting"])["value"]
    assert v[("RoDA", "gaussian_noise")] == 87.92 and v[("PatchCore", "contrast")] == 60.89
    assert v[("RoDA", "mean")] == pytest.approx(np.mean([v[("RoDA", c)] for c in CONDS]), abs=0.01)


def test_every_claim_refers_to_existing_rows(ref):
    keys = set(ref["key"])
    for claim in fid.ALL_CLAIMS:
        for k in claim.paper_a + claim.paper_b:
            assert k in keys, (claim.id, k)
    ids = [c.id for c in fid.ALL_CLAIMS]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------- fidelity_table on planted effects

def test_planted_paper_effect_is_reproduced_in_size(ref):
    paper = {c: _paper_effect(ref, f"t1_roda_vs_patchcore_{c}") for c in CONDS}
    table = fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": _grid(paper.get)}, n_boot=4000)
    rows = _by_id(table)
    for cond in CONDS:
        row = rows[(f"t1_roda_vs_patchcore_{cond}", True)]
        assert row.verdict == "reproduced in size", (cond, row.why)
        assert row.n_categories == 4 and row.n_cells == 12 and row.file == "08_roda_grid"
        assert row.ours_effect == pytest.approx(paper[cond], abs=0.5) and row.ci_low < row.paper_effect < row.ci_high
        assert row.p_holm >= row.p_value and row.stage == "native" and "severity=5" in row.filter
    assert rows[("t1_roda_vs_patchcore_mean", True)].verdict == "reproduced in size"
    # a planted effect far larger than the paper's: reproduced, not in size
    big = fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": _grid(lambda c: 40.0)}, n_boot=4000)
    assert _by_id(big)[("t1_roda_vs_patchcore_gaussian_noise", True)].verdict == "reproduced"


def test_planted_opposite_effect_is_contradicted(ref):
    table = fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": _grid(lambda c: -8.0)}, n_boot=4000)
    rows = _by_id(table)
    for cond in CONDS:
        assert rows[(f"t1_roda_vs_patchcore_{cond}", True)].verdict == "contradicted"
        assert rows[(f"t3_roda_vs_patchcore_pixel_{cond}", True)].verdict == "contradicted"  # pixel: same test
    # no effect, little noise: every interval rules out the paper's sizes
    null = _by_id(fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": _grid(lambda c: 0.0)}, n_boot=4000))
    assert null[("t1_roda_vs_patchcore_contrast", True)].verdict == "not reproduced"


def test_tiny_sample_in_the_table_is_inconclusive_and_one_cell_not_testable(ref):
    paper = {c: _paper_effect(ref, f"t1_roda_vs_patchcore_{c}") for c in CONDS}
    tiny = _grid(paper.get, tasks=("mvtec/bottle",), seeds=(0, 1), noise=3.0)
    row = _by_id(fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": tiny}))[
        ("t1_roda_vs_patchcore_gaussian_noise", True)]
    assert row.verdict == "inconclusive" and row.n_cells == 2 and row.ci_low < 0 < row.paper_effect < row.ci_high
    one = _grid(paper.get, tasks=("mvtec/bottle",), seeds=(0,))
    row = _by_id(fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": one}))[
        ("t1_roda_vs_patchcore_gaussian_noise", True)]
    assert row.verdict == "not testable" and math.isnan(row.ci_low)


def test_holm_across_the_claims_of_a_paper(ref):
    # one claim alone is significant at 0.05; with the paper's other tested claims it is not
    grid = _grid(lambda c: 6.0 if c == "gaussian_noise" else 0.0, tasks=("mvtec/bottle",), seeds=(0, 1, 2, 3),
                 noise=1.0, seed=3)
    table = fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": grid}, n_boot=4000)
    row = _by_id(table)[("t1_roda_vs_patchcore_gaussian_noise", True)]
    tested = table[table.p_value.notna()]
    assert len(tested) == 9 and row.p_value < 0.05 <= row.p_holm
    assert row.p_holm == pytest.approx(effects.holm(tested.p_value)[list(tested.claim_id).index(row.claim_id)])
    assert row.verdict == "inconclusive"  # without Holm: reproduced in size


def test_both_methods_at_the_ceiling_are_not_testable(ref):
    grid = _grid(lambda c: 0.0).assign(image_auroc=1.0, pixel_auroc=1.0)
    row = _by_id(fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": grid}))[
        ("t1_roda_vs_patchcore_contrast", True)]
    assert row.verdict == "not testable" and "no variation" in row.why and math.isnan(row.p_value)


def test_no_verdict_without_an_interval(ref):
    grid = _grid(lambda c: 3.0, noise=4.0)
    table = fid.fidelity_table(fid.ALL_CLAIMS, ref, {"08_roda_grid": grid}, n_boot=2000)
    assert "not significant" not in set(table.verdict)
    assert set(table.verdict) <= set(fid.VERDICTS)
    decided = table[table.verdict.isin(["reproduced in size", "reproduced", "contradicted", "not reproduced",
                                        "inconclusive"])]
    assert len(decided) and decided[["ci_low", "ci_high", "ours_effect"]].notna().all().all()


# ---------------------------------------------------------------- shortcut, stage, schedule, inputs

def test_screw_image_auroc_is_reported_not_counted(ref):
    grid = _grid(lambda c: 8.0, tasks=("mvtec/bottle", "mvtec/tire", "mvtec/screw"))
    shortcut = pd.DataFrame(dict(task=["mvtec/screw", "mvtec/bottle", "mvtec/tire"], mean_grey_auroc=[1.0, 0.52, 0.05],
                                 contrast_auroc=[0.95, 0.7, 0.5]))
    table = fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": grid, "01_shortcut": shortcut}, n_boot=2000)
    rows = _by_id(table)
    # tire's grey level separates it too, reversed (AUROC 0.05): also a shortcut
    counted, screw = rows[("t1_roda_vs_patchcore_brightness", True)], rows[("t1_roda_vs_patchcore_brightness", False)]
    assert counted.tasks == "mvtec/bottle" and screw.tasks == "mvtec/screw, mvtec/tire"
    assert "shortcut" in screw.caveat and "1.00" in screw.caveat and not counted.caveat
    # pixel AUROC does not carry the shortcut: one counted row over all three
    assert rows[("t3_roda_vs_patchcore_pixel_brightness", True)].n_categories == 3
    assert ("t3_roda_vs_patchcore_pixel_brightness", False) not in rows
    total = fid.summary(table).loc["roda"].sum()
    assert total == table.counted.sum() < len(table)
    # without the shortcut table every category counts
    plain = _by_id(fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": grid}, n_boot=2000))
    assert plain[("t1_roda_vs_patchcore_brightness", True)].n_categories == 3


def test_the_stage_is_read_never_pooled(ref):
    native, working = _grid(lambda c: 8.0, stage="native"), _grid(lambda c: -8.0, stage="working", seed=1)
    both = pd.concat([native, working])
    ctx = dict(profile="real_full", tasks=["mvtec/bottle"])
    row = _by_id(fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": both}, ctx, n_boot=2000))[
        ("t1_roda_vs_patchcore_contrast", True)]
    assert row.ours_effect == pytest.approx(8.0, abs=0.5) and row.n_cells == 12
    row = _by_id(fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": both}, ctx, stage="working",
                                    n_boot=2000))[("t1_roda_vs_patchcore_contrast", True)]
    assert row.ours_effect == pytest.approx(-8.0, abs=0.5) and row.stage == "working"
    # a table without the column was measured at the working stage: no native verdict, and the command to get one
    table = fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": working.drop(columns="stage")}, ctx)
    row = _by_id(table)[("t1_roda_vs_patchcore_contrast", True)]
    assert row.verdict == "not run" and "no native-stage rows" in row.why
    assert "run_roda_grid.py --profile real_full --stage native --tasks mvtec/bottle" in row.why
    assert "--methods roda,patchcore" in row.why
    # the fallback table answers where the grid does not
    row = _by_id(fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": working, "03_roda": native}, ctx,
                                    n_boot=2000))[("t1_roda_vs_patchcore_contrast", True)]
    assert row.file == "03_roda" and row.ours_effect == pytest.approx(8.0, abs=0.5)


def test_a_mean_over_corruptions_needs_every_corruption_in_the_cell(ref):
    grid = _grid(lambda c: 20.0 if c == "contrast" else 0.0)
    full = _by_id(fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": grid}, n_boot=1000))
    assert full[("t1_roda_vs_patchcore_mean", True)].ours_effect == pytest.approx(5.0, abs=0.3)
    # seed 2 of one task lacks contrast: that cell leaves the mean claims, not the others
    part = grid[~((grid.task == "ksdd") & (grid.seed == 2) & (grid.condition == "contrast"))]
    rows = _by_id(fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": part}, n_boot=1000))
    assert rows[("t1_roda_vs_patchcore_mean", True)].n_cells == 11
    assert rows[("t1_roda_vs_patchcore_mean", True)].ours_effect == pytest.approx(5.0, abs=0.3)
    assert rows[("t1_roda_vs_patchcore_gaussian_noise", True)].n_cells == 12


def test_pixel_auroc_without_masks_is_not_comparable(ref):
    grid = _grid(lambda c: 5.0, pixel=False)
    row = _by_id(fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": grid}))[
        ("t3_roda_vs_patchcore_pixel_contrast", True)]
    assert row.verdict == "not comparable" and "no pixel_auroc" in row.why


def test_missing_results_folder_gives_not_run_with_a_command(ref, tmp_path):
    table = fid.fidelity_table(fid.ALL_CLAIMS, ref, tmp_path, dict(profile="elpv"))
    assert len(table) > 0 and set(table["verdict"]) == {"not run"}
    assert table["why"].str.contains("produce it with: ").all()
    assert table["why"].str.contains("run_notebooks.py --profile elpv --only 04 --set corruption.stage=native").any()
    assert table["why"].str.contains("run_notebooks.py --profile elpv --only 05$").any()


def _dpdl(schedule=None, methods=(("dpdl", 0.90), ("devnet", 0.80), ("dra", 0.895), ("flos", 0.95)),
          tasks=("elpv", "headct", "brainmri", "ksdd_thirds"), seeds=range(5)):
    rng = np.random.default_rng(0)
    rows = [dict(task=t, setting="general", seen_class="all", n_anomalies=m, method=method, seed=s,
                 auroc=v - 0.01 * (m == 1) + rng.normal(0, 0.003), test_normal=100, test_anomaly=100)
            for t in tasks for s in seeds for method, v in methods for m in (10, 1)]
    df = pd.DataFrame(rows)
    return df.assign(schedule=schedule) if schedule else df


def test_dpdl_claims(ref):
    ctx = dict(backbone="mobilenet_v2", dpdl_tasks=["elpv", "headct", "brainmri", "ksdd_thirds"],
               dpdl_schedule="50x20", profile="real_full")
    table = fid.fidelity_table(fid.DPDL_CLAIMS, ref, {"05_general_runs": _dpdl()}, ctx, n_boot=2000)
    rows = _by_id(table)
    row = rows[("dpdl_vs_devnet_general_m10", True)]
    assert row.verdict in ("reproduced", "reproduced in size") and row.n_categories == 4 and row.n_cells == 20
    assert rows[("dpdl_vs_flos_general_m10", True)].verdict == "contradicted"
    assert rows[("dpdl_vs_devnet_general_m10_elpv", True)].paper_a == 93.7
    assert rows[("abs_dpdl_general_m10_elpv", True)].verdict == "not comparable"
    assert "ResNet-18" in rows[("abs_dpdl_general_m10_elpv", True)].data
    # datasets outside the profile are left out; datasets of the profile without a file are not run
    assert not table.claim_id.str.endswith("_mvtec_screw").any()
    assert rows[("dpdl_vs_devnet_hard_m10_elpv", True)].verdict == "not run"
    assert "--only 05" in rows[("t3_full_vs_m_r", True)].why


def test_dpdl_schedule_other_than_the_papers_is_not_counted(ref):
    ctx = dict(dpdl_tasks=["elpv"], profile="real_full")
    mixed = pd.concat([_dpdl("50x20x16"), _dpdl("10x20x48", methods=(("dpdl", 0.5), ("devnet", 0.9)))])
    rows = _by_id(fid.fidelity_table(fid.DPDL_CLAIMS, ref, {"05_general_runs": mixed}, ctx, n_boot=2000))
    assert rows[("dpdl_vs_devnet_general_m10", True)].ours_effect == pytest.approx(10.0, abs=0.5)  # 50 x 20 only
    short = _dpdl("10x20x48")
    rows = _by_id(fid.fidelity_table(fid.DPDL_CLAIMS, ref, {"05_general_runs": short}, ctx, n_boot=2000))
    row = rows[("dpdl_vs_devnet_general_m10", False)]
    assert "10x20" in row.caveat and "--set dpdl.epochs=50" in row.caveat
    # the profile's schedule stands in for runs without the column
    rows = _by_id(fid.fidelity_table(fid.DPDL_CLAIMS, ref, {"05_general_runs": _dpdl()},
                                     dict(ctx, dpdl_schedule="50x20"), n_boot=2000))
    assert ("dpdl_vs_devnet_general_m10", True) in rows


def test_dpdl_hard_and_ablation_files(ref):
    hard = pd.DataFrame([dict(task="elpv", setting="hard", seen_class=c, n_anomalies=10, seed=s, method=m,
                              auroc=v + (0.02 if c == "mono" else -0.02) + 0.002 * s)
                         for c in ("mono", "poly") for s in range(4) for m, v in (("dpdl", 0.82), ("devnet", 0.70))])
    abl = pd.DataFrame([dict(task=t, setting="general", seen_class="all", n_anomalies=10, seed=s, method=m,
                             auroc=v + 0.002 * s + 0.01 * i)
                        for i, t in enumerate(("elpv", "headct", "brainmri")) for s in range(3)
                        for m, v in (("DPDL", 0.93), ("M_r", 0.88), ("M_n + M_r", 0.925), ("M_a + M_r", 0.93),
                                     ("w/o DPL", 0.85), ("w/o DFL", 0.97))])
    rows = _by_id(fid.fidelity_table(fid.DPDL_CLAIMS, ref, {"05_hard_runs": hard, "05_ablation_runs": abl},
                                     dict(dpdl_tasks=["elpv"]), n_boot=2000))
    row = rows[("dpdl_vs_devnet_hard_m10_elpv", True)]
    assert row.ours_a == pytest.approx(82.3) and row.n_cells == 4 and row.paper_a == 81.8  # seen classes averaged
    assert rows[("t3_full_vs_m_r", True)].verdict in ("reproduced", "reproduced in size")
    assert rows[("fig2_full_vs_w_o_dpl", True)].verdict == "reproduced"
    assert rows[("fig2_full_vs_w_o_dfl", True)].verdict == "contradicted"
    assert "figure only" in rows[("fig2_full_vs_w_o_dfl", True)].paper_value
    # notebook 05 names the full model DPDL, scripts/run_dpdl.py dpdl: both answer
    rows = _by_id(fid.fidelity_table(fid.DPDL_CLAIMS, ref, {"05_ablation_runs": abl.replace("DPDL", "dpdl")},
                                     n_boot=2000))
    assert rows[("fig2_full_vs_w_o_dpl", True)].verdict == "reproduced"


def test_absolute_claims(ref):
    claim = fid.Claim("abs", "roda", "PatchCore clean 98.81", "absolute", a={"condition": "clean"})
    ok, reason = fid.comparability(claim, ["elpv"], "mobilenet_v2")
    assert not ok and "mobilenet_v2" in reason and "WRN-50" in reason
    claim_data = fid.Claim("abs2", "roda", "x", "absolute", data_tasks=MVTEC_TASKS)
    ok, reason = fid.comparability(claim_data, ["mvtec/screw"], "wide_resnet50_2")
    assert not ok and "data" in reason and "backbone" not in reason
    assert fid.comparability(claim_data, list(MVTEC_TASKS), "wide_resnet50_2")[0]

    def frame(value, m_max=10):
        return pd.DataFrame([dict(task="elpv", setting="general", seen_class="all", n_anomalies=m, method="dpdl",
                                  seed=s, auroc=value + 0.002 * (s - 2)) for m in (m_max, 1) for s in range(5)])
    claims = [c for c in fid.DPDL_CLAIMS if c.id == "abs_dpdl_general_m10_elpv"]
    ctx = dict(backbone="resnet18", dpdl_tasks=["elpv"])
    same = fid.fidelity_table(claims, ref, {"05_general_runs": frame(0.937)}, ctx).iloc[0]
    assert same.verdict == "reproduced in size" and same.ci_low < 93.7 < same.ci_high and math.isnan(same.p_holm)
    far = fid.fidelity_table(claims, ref, {"05_general_runs": frame(0.90)}, ctx).iloc[0]
    assert far.verdict == "not reproduced"
    fewer = fid.fidelity_table(claims, ref, {"05_general_runs": frame(0.937, m_max=2)}, ctx).iloc[0]
    assert fewer.verdict == "not comparable" and "n_anomalies 2 vs the paper's 10" in fewer.why
    other = fid.fidelity_table(claims, ref, {"05_general_runs": frame(0.937)}, dict(ctx, backbone="mobilenet_v2"))
    assert other.verdict.iloc[0] == "not comparable" and "backbone mobilenet_v2" in other.why.iloc[0]


def test_table5_ratio_and_fig5b_terms(ref):
    t5 = pd.DataFrame([dict(task=t, adapt_fraction=f, condition=c, seed=s, image_auroc=v + 0.001 * s + 0.02 * i)
                       for i, t in enumerate(("a", "b", "c")) for f, v in ((0.2, 0.90), (1.0, 0.91)) for c in CONDS
                       for s in range(3)])
    fig5b = pd.DataFrame([dict(task=t, method=m, severity=sev, seed=s, image_auroc=v + 0.001 * s + 0.01 * i)
                          for i, t in enumerate(("a", "b", "c")) for s in range(3)
                          for m, sev, v in (("roda", 1, 0.90), ("patchcore", 1, 0.89), ("roda", 5, 0.85),
                                            ("patchcore", 5, 0.70))])
    rows = _by_id(fid.fidelity_table(fid.RODA_CLAIMS, ref, {"04_table5": t5, "04_fig5b": fig5b}, stage="working",
                                     n_boot=2000))
    # 90 vs 0.98 x 91 = 89.18: A - 0.98 B = +0.82 (+ 0.02 x (1 - 0.98) x 100 x task offsets)
    assert rows[("t5_20pct_reaches_98pct", True)].ours_effect == pytest.approx(0.82 + 0.04 * 100 * 0.02 / 2, abs=0.01)
    gap = rows[("fig5b_gap_grows_with_severity", True)]
    assert gap.ours_effect == pytest.approx(14.0) and gap.verdict == "reproduced"  # the same 14 in every cell
    assert "figure only" in gap.paper_value


def test_results_in_percent_are_not_rescaled():
    df = pd.DataFrame(dict(method=["a", "b"], seed=[0, 0], share_assigned=[16.0, 46.0]))
    cells, _ = fid.side_cells(df, {"method": "a"}, "share_assigned")
    assert cells.iloc[0] == 16.0
    cells, _ = fid.side_cells(df.assign(share_assigned=[0.16, 0.46]), {"method": "a"}, "share_assigned")
    assert math.isclose(cells.iloc[0], 16.0)


def test_forest_plot_draws_one_line_per_claim_with_the_paper_marked(ref):
    from lib.reporting import figures

    table = fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": _grid(lambda c: 8.0)}, n_boot=1000)
    fig = figures.forest(table[table.paper == "roda"], title="RoDA")
    ax = fig.axes[0]
    shown = table[table.ours_effect.notna()]
    assert len(ax.get_yticklabels()) == len(shown)
    assert any(t.get_text().startswith("paper") for t in ax.get_legend().get_texts())


def test_two_sides_without_a_shared_cell_are_not_run(ref):
    """PatchCore never ran on screw, RoDA did: screw's shortcut row has no paired cell, so no effect (it crashed)."""
    grid = _grid(lambda c: 5.0, tasks=("mvtec/screw", "mvtec/bottle", "mvtec/tire"))
    grid = grid[~((grid.task == "mvtec/screw") & (grid.method == "patchcore"))]
    shortcut = pd.DataFrame(dict(task=["mvtec/screw", "mvtec/bottle", "mvtec/tire"], mean_grey_auroc=[1.0, 0.52, 0.6]))
    table = fid.fidelity_table(fid.RODA_CLAIMS, ref, {"08_roda_grid": grid, "01_shortcut": shortcut}, n_boot=200)
    rows = _by_id(table)
    assert rows[("t1_roda_vs_patchcore_gaussian_noise", True)].n_cells == 6  # bottle and tire
    screw = rows[("t1_roda_vs_patchcore_gaussian_noise", False)]
    assert screw.verdict == "not run" and screw.n_cells == 0


def test_write_verdicts_reads_the_profiles_folder_and_writes_one_table_per_stage(tmp_path):
    """notebook 06 / scripts/fidelity_tables.py: the grid in the profile's results folder gives each stage its own
    verdicts (planted +8 native, -8 working), both tables written, with the profile's name."""
    from lib.common.utils import read_csv, write_csv
    from lib.experiments import profiles
    from lib.reporting import verdicts

    cfg = profiles.get_profile("smoke", out_dir=tmp_path)
    grid = pd.concat([_grid(lambda c: 8.0, stage="native"), _grid(lambda c: -8.0, stage="working", seed=1)])
    write_csv(grid, f"{cfg.results_dir}/08_roda_grid.csv")
    tables = verdicts.write_verdicts(cfg, plots=True)
    for stage, effect, name in (("native", 8.0, "06_fidelity"), ("working", -8.0, "06_fidelity_working")):
        written = read_csv(f"{cfg.results_dir}/{name}.csv")
        assert len(written) == len(tables[stage]) and set(written["profile"]) == {"smoke"}
        row = written[(written.claim_id == "t1_roda_vs_patchcore_contrast") & written.counted.astype(bool)].iloc[0]
        assert row.stage == stage and row.ours_effect == pytest.approx(effect, abs=0.5)
    assert (Path(cfg.figures_dir) / "06_fidelity_forest_roda.png").is_file()
    assert (Path(cfg.figures_dir) / "06_fidelity_forest_roda_working.png").is_file()


def test_table4_claims_read_the_grids_rows_before_notebook_04s(ref, tmp_path):
    """A grid with the Table 4 rows at the native stage answers the native Table 4 claims (KL 5 points below no
    alignment, planted); notebook 04's working-stage table still answers the working ones (KL 3 points above)."""
    grid = _grid(lambda c: 0.0, tasks=("mvtec/bottle", "mvtec/tire"))
    kl = grid[grid.method == "patchcore"].assign(method="t4_kl", image_auroc=lambda d: d.image_auroc - 0.05,
                                                  pixel_auroc=lambda d: d.pixel_auroc - 0.05)
    pd.concat([grid, kl]).to_csv(tmp_path / "08_roda_grid.csv", index=False)
    pd.DataFrame([dict(task=t, row=r, condition=c, seed=s, image_auroc=0.6 + (0.03 if r == "kl" else 0.0) + 0.01 * s)
                  for t in ("mvtec/bottle", "mvtec/tire") for r in ("kl", "no_alignment") for c in CONDS
                  for s in range(3)]).to_csv(tmp_path / "04_table4.csv", index=False)
    results = fid.load_results(tmp_path)
    claims = [c for c in fid.RODA_CLAIMS if c.id == "t4_kl_vs_no_alignment_mean"]
    native = fid.fidelity_table(claims, ref, results, stage="native", n_boot=500).iloc[0]
    assert native.file == "08_roda_grid_table4" and native.ours_effect == pytest.approx(-5.0)
    working = fid.fidelity_table(claims, ref, results, stage="working", n_boot=500).iloc[0]
    assert working.file == "04_table4" and working.ours_effect == pytest.approx(3.0)
