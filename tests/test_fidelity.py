"""The paper-vs-ours fidelity logic (lib/reporting/fidelity.py) and the reference numbers it reads."""

import math

import numpy as np
import pandas as pd
import pytest

from lib.reporting import fidelity as fid
from lib.reporting.claims import MVTEC_TASKS

CONDS = ("gaussian_noise", "defocus_blur", "brightness", "contrast")


@pytest.fixture(scope="module")
def ref():
    return fid.load_reference()


def _order(**kw):
    base = dict(id="x", paper="roda", text="A beats B", kind="order", a={"method": "a"}, b={"method": "b"},
                label_a="A", label_b="B")
    base.update(kw)
    return fid.Claim(**base)


# ---------------------------------------------------------------- the test and the verdict, known answers

def test_hanley_mcneil_at_chance_is_the_mann_whitney_null_variance():
    # at A = 0.5 the Hanley-McNeil variance equals Var(U / n1 n0) = (n1 + n0 + 1) / (12 n1 n0)
    for n1, n0 in ((10, 10), (24, 8), (95, 33)):
        assert fid.auroc_se(0.5, n1, n0) == pytest.approx(math.sqrt((n1 + n0 + 1) / (12 * n1 * n0)))
    assert fid.auroc_se(1.0, 10, 10) == 0.0
    assert fid.auroc_se(0.9, 100, 100) < fid.auroc_se(0.9, 10, 10)


def test_difference_test_without_split_error_is_the_paired_t_test():
    from scipy import stats
    d = np.array([1.0, 2.5, 0.5, 3.0, 1.5])
    est, se, p = fid.difference_test(d)
    assert est == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / math.sqrt(5))
    assert p == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    # one seed and no split error: no estimate
    est, se, p = fid.difference_test([3.0])
    assert est == 3.0 and math.isnan(se) and math.isnan(p)
    # one seed with a split error: a z test
    est, se, p = fid.difference_test([3.0], se_split=1.5)
    assert se == 1.5 and p == pytest.approx(2 * stats.norm.sf(2.0))


def test_difference_test_keeps_its_level_on_identical_methods():
    rng = np.random.default_rng(0)
    # 2000 experiments of 5 seeds where A and B are the same method: about 5% false positives
    p = np.array([fid.difference_test(rng.normal(0, 2, 5) - rng.normal(0, 2, 5))[2] for _ in range(2000)])
    assert 0.03 < np.mean(p < 0.05) < 0.07


def test_clearly_separated_is_reproduced():
    v, why, p, se = fid.verdict(_order(), [90.0, 91.0, 90.5], [85.0, 85.5, 84.5], paper_a=88.0, paper_b=80.0)
    assert v == "reproduced" and p < 0.05 and "+5.50" in why


def test_identical_is_not_significant():
    v, why, p, _ = fid.verdict(_order(), [85.0, 86.0, 84.0], [85.2, 85.8, 84.1], paper_a=88.0, paper_b=80.0)
    assert v == "not significant" and p > 0.5
    # a 3-point mean gap is not significant when the split's error is 5 points per side
    v, _, p, se = fid.verdict(_order(), [88.0, 88.1], [85.0, 85.1], se_a=5.0, se_b=5.0, paper_a=88.0, paper_b=80.0)
    assert v == "not significant" and se == pytest.approx(math.sqrt(50), rel=1e-3)
    # one seed and no split size: no error estimate, never a verdict either way
    v, why, _, _ = fid.verdict(_order(), [95.0], [60.0], paper_a=88.0, paper_b=80.0)
    assert v == "not significant" and "no error estimate" in why


def test_reversed_is_not_reproduced():
    v, why, p, _ = fid.verdict(_order(), [80.0, 80.5, 79.5], [85.0, 85.5, 84.5], paper_a=88.0, paper_b=80.0)
    assert v == "not reproduced" and "opposite" in why and p < 0.05


def test_expected_sign_follows_the_paper():
    # the paper has A below B (TTAC under PatchCore): ours A clearly below B reproduces it
    a, b = [60.0, 61.0, 59.0], [80.0, 80.5, 79.5]
    assert fid.verdict(_order(), a, b, paper_a=58.99, paper_b=80.23)[0] == "reproduced"
    assert fid.verdict(_order(expect=1), a, b)[0] == "not reproduced"


def test_absolute_with_another_backbone_is_not_comparable():
    claim = fid.Claim("abs", "roda", "PatchCore clean 98.81", "absolute", a={"condition": "clean"})
    ok, reason = fid.comparability(claim, ["elpv"], "mobilenet_v2")
    assert not ok and "mobilenet_v2" in reason and "WRN-50" in reason
    v, why, _, _ = fid.verdict(claim, [95.0], comparable=ok, reason=reason, paper_a=98.81)
    assert v == "not comparable" and "backbone" in why
    claim_data = fid.Claim("abs2", "roda", "x", "absolute", data_tasks=MVTEC_TASKS)
    ok, reason = fid.comparability(claim_data, ["mvtec/screw"], "wide_resnet50_2")
    assert not ok and "data" in reason and "backbone" not in reason
    ok, _ = fid.comparability(claim_data, list(MVTEC_TASKS), "wide_resnet50_2")
    assert ok
    # inside our interval: reproduced; far outside: not reproduced
    assert fid.verdict(claim, [98.5, 98.9, 98.7], paper_a=98.81)[0] == "reproduced"
    assert fid.verdict(claim, [90.0, 90.2, 89.9], paper_a=98.81)[0] == "not reproduced"
    assert fid.verdict(claim, [98.0], se_a=1.0, paper_a=98.81)[0] == "reproduced"


def test_ratio_claim():
    claim = _order(kind="ratio", scale=0.98, expect=1)
    assert fid.verdict(claim, [91.0, 91.2, 90.9], [92.0, 92.1, 91.9])[0] == "reproduced"  # 91 >> 90.16
    assert fid.verdict(claim, [90.0, 90.5, 89.8], [92.0, 91.5, 92.3])[0] == "not significant"
    assert fid.verdict(claim, [80.0, 80.5, 79.5], [92.0, 92.1, 91.9])[0] == "not reproduced"


def test_missing_numbers_are_not_run():
    assert fid.verdict(_order(), [float("nan")], [80.0])[0] == "not run"
    assert fid.verdict(_order(), [80.0], None)[0] == "not run"


def test_split_error_from_counts():
    df = pd.DataFrame(dict(task=["t", "t"], auroc=[0.5, 0.9], test_normal=[10, 10], test_anomaly=[10, 10]))
    se = fid.split_se(df, "auroc")
    assert se.iloc[0] == pytest.approx(100 * math.sqrt(21 / 1200))
    df = pd.DataFrame(dict(task=["t"], image_auroc=[0.5]))
    assert math.isnan(fid.split_se(df, "image_auroc").iloc[0])
    assert fid.split_se(df, "image_auroc", {"t": (10, 10)}).iloc[0] == pytest.approx(100 * math.sqrt(21 / 1200))
    share = pd.DataFrame(dict(share_assigned=[0.2], n_anomalous_patches=[100]))
    assert fid.split_se(share, "share_assigned").iloc[0] == pytest.approx(4.0)
    assert math.isnan(fid.split_se(df.rename(columns={"image_auroc": "pixel_auroc"}), "pixel_auroc",
                                   {"t": (10, 10)}).iloc[0])


# ---------------------------------------------------------------- the reference file

def test_reference_csv_loads_with_expected_columns(ref):
    assert set(fid.REFERENCE_COLUMNS) <= set(ref.columns)
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


# ---------------------------------------------------------------- fidelity_table on synthetic results

def _roda_frame(seeds=(0, 1, 2)):
    rng = np.random.default_rng(0)
    level = {"patchcore": 0.70, "ttt++": 0.74, "ttac": 0.60, "roda": 0.80}
    rows = []
    for seed in seeds:
        for method, base in level.items():
            for cond in CONDS:
                rows.append(dict(task="elpv", backbone="mobilenet_v2", method=method, condition=cond, severity=5,
                                 seed=seed, image_auroc=base + rng.normal(0, 0.002), pixel_auroc=float("nan"),
                                 adapt_seconds=1.0))
    return pd.DataFrame(rows)


def test_fidelity_table_on_synthetic_results(ref):
    results = {"03_roda": _roda_frame()}
    table = fid.fidelity_table(fid.RODA_CLAIMS, ref, results)
    assert list(table.columns) == list(fid.TABLE_COLUMNS)
    by_id = table.set_index("claim_id")
    row = by_id.loc["t1_roda_vs_patchcore_gaussian_noise"]
    assert row.verdict == "reproduced" and row.task == "elpv" and row.n_seeds == 3
    assert row.ours_a == pytest.approx(80.0, abs=0.5) and row.paper_a == 87.92
    assert "±" in row.ours and "mobilenet_v2" in row.why
    assert by_id.loc["t1_ttac_vs_patchcore_contrast", "verdict"] == "reproduced"
    assert by_id.loc["t1_roda_vs_tttpp_brightness", "verdict"] == "reproduced"
    # pixel AUROC is NaN (no masks): not comparable, not a failure
    assert by_id.loc["t3_roda_vs_patchcore_pixel_contrast", "verdict"] == "not comparable"
    # absolute numbers with a bundled backbone on ELPV are never compared
    absolute = by_id.loc["abs_roda_mean"]
    assert absolute.verdict == "not comparable" and "backbone" in absolute.why and "data" in absolute.why
    # missing files say so
    assert set(by_id.loc[by_id.index.str.startswith("t4_"), "verdict"]) == {"not run"}
    assert "not found" in by_id.loc["t5_20pct_reaches_98pct", "why"]


def test_fidelity_table_within_noise_and_ablation_files(ref):
    t4 = []
    for seed in (0, 1):
        for row, val in (("ot_discrete", 0.801), ("ot_continuous", 0.800), ("ot_discrete_copy", 0.75),
                         ("ot_discrete_augment", 0.70)):
            for cond in CONDS:
                t4.append(dict(task="synthetic", row=row, condition=cond, seed=seed, image_auroc=val + 0.001 * seed,
                               pixel_auroc=0.9))
    fig5b = [dict(task="synthetic", method=m, severity=s, seed=0, image_auroc=v)
             for m, s, v in (("roda", 1, 0.90), ("patchcore", 1, 0.89), ("roda", 5, 0.85), ("patchcore", 5, 0.70))]
    t5 = [dict(task="synthetic", adapt_fraction=f, condition=c, seed=0, image_auroc=v, pixel_auroc=0.9)
          for f, v in ((0.2, 0.90), (0.8, 0.91), (1.0, 0.91)) for c in CONDS]
    # the evaluation split: 500 normal, 500 anomalous images (its AUROC error is ~1.5 points)
    split = pd.DataFrame([dict(task="synthetic", split="target eval", images=1000, normal=500, anomalous=500)])
    table = fid.fidelity_table(fid.RODA_CLAIMS, ref, {"04_table4": pd.DataFrame(t4), "04_fig5b": pd.DataFrame(fig5b),
                                                      "04_table5": pd.DataFrame(t5), "01_target_split": split})
    by_id = table.set_index("claim_id")
    row = by_id.loc["t4_discrete_vs_continuous_gaussian_noise"]
    # 0.1 points, the same in both seeds: significant by the seeds alone, not with the split's error
    assert row.verdict == "not significant" and row.ours_se > 1.5
    # augment below copy: the opposite of the paper
    assert by_id.loc["t4_augment_vs_copy_contrast", "verdict"] == "not reproduced"
    assert "opposite" in by_id.loc["t4_augment_vs_copy_contrast", "why"]
    # gap 15 points at severity 5 vs 1 point at severity 1
    assert by_id.loc["fig5b_gap_grows_with_severity", "verdict"] == "reproduced"
    assert by_id.loc["fig5b_gap_grows_with_severity", "ours_diff"] == pytest.approx(14.0)
    assert "figure only" in by_id.loc["fig5b_gap_grows_with_severity", "paper_value"]
    # 90 vs 0.98 x 91 and 91 vs 90: inside the split's error
    assert by_id.loc["t5_20pct_reaches_98pct", "verdict"] == "not significant"
    assert by_id.loc["t5_100pct_vs_20pct", "verdict"] == "not significant"


def test_fidelity_table_dpdl(ref):
    rows = []
    for seed in range(3):
        for method, val in (("dpdl", 0.90), ("devnet", 0.80), ("dra", 0.895), ("flos", 0.95)):
            for m in (10, 1):
                rows.append(dict(task="elpv", setting="general", seen_class="all", n_anomalies=m, method=method,
                                 seed=seed, auroc=val - 0.01 * (m == 1) + 0.001 * seed, test_normal=1000,
                                 test_anomaly=1000))
    table = fid.fidelity_table(fid.DPDL_CLAIMS, ref, {"05_general_runs": pd.DataFrame(rows)},
                               context={"backbone": "mobilenet_v2"})
    by_id = table.set_index("claim_id")
    assert by_id.loc["dpdl_vs_devnet_general_m10", "verdict"] == "reproduced"
    assert by_id.loc["dpdl_vs_devnet_general_m10_elpv", "paper_a"] == 93.7
    assert by_id.loc["dpdl_vs_dra_general_m1_elpv", "verdict"] == "not significant"
    assert by_id.loc["dpdl_vs_flos_general_m10", "verdict"] == "not reproduced"
    assert by_id.loc["abs_dpdl_general_m10_elpv", "verdict"] == "not comparable"
    assert "ResNet-18" in by_id.loc["abs_dpdl_general_m10_elpv", "why"]
    # no hard-setting file: not run; datasets we did not run are left out
    assert by_id.loc["dpdl_vs_devnet_hard_m10", "verdict"] == "not run"
    assert not by_id.index.str.endswith("_headct").any()
    # ablation file missing
    assert by_id.loc["t3_full_vs_m_r", "verdict"] == "not run"


def test_dpdl_hard_and_ablation_files(ref):
    hard = pd.DataFrame([dict(task="elpv", setting="hard", seen_class=c, n_anomalies=10, seed=s, method=m,
                              auroc=v + (0.02 if c == "mono" else -0.02))
                         for c in ("mono", "poly") for s in (0, 1) for m, v in (("dpdl", 0.82), ("devnet", 0.70))])
    abl = pd.DataFrame([dict(task="elpv", setting="general", seen_class="all", n_anomalies=10, seed=s, method=m,
                             auroc=v + 0.001 * s, test_normal=500, test_anomaly=500)
                        for s in (0, 1, 2) for m, v in (("DPDL", 0.93), ("M_r", 0.88), ("M_n + M_r", 0.925),
                                                        ("M_a + M_r", 0.93), ("w/o DPL", 0.85), ("w/o DFL", 0.97))])
    table = fid.fidelity_table(fid.DPDL_CLAIMS, ref, {"05_hard_runs": hard, "05_ablation_runs": abl})
    by_id = table.set_index("claim_id")
    row = by_id.loc["dpdl_vs_devnet_hard_m10_elpv"]
    assert row.verdict == "reproduced" and row.ours_a == pytest.approx(82.0) and row.paper_a == 81.8
    assert by_id.loc["t3_full_vs_m_r", "verdict"] == "reproduced"
    assert by_id.loc["t3_full_vs_m_n_p_m_r", "verdict"] == "not significant"
    assert by_id.loc["fig2_full_vs_w_o_dpl", "verdict"] == "reproduced"
    assert by_id.loc["fig2_full_vs_w_o_dfl", "verdict"] == "not reproduced"
    assert "figure only" in by_id.loc["fig2_full_vs_w_o_dfl", "paper_value"]


def test_missing_results_folder_gives_not_run(ref, tmp_path):
    table = fid.fidelity_table(fid.ALL_CLAIMS, ref, tmp_path)
    assert len(table) > 0 and set(table["verdict"]) == {"not run"}
    assert table["why"].str.contains("not found").all()


def test_results_in_percent_are_not_rescaled():
    df = pd.DataFrame(dict(method=["a", "b"], seed=[0, 0], share_assigned=[16.0, 46.0]))
    s, _, _ = fid.ours_per_seed(df, {"method": "a"}, "share_assigned")
    assert s.iloc[0] == 16.0
    s, _, _ = fid.ours_per_seed(df.assign(share_assigned=[0.16, 0.46]), {"method": "a"}, "share_assigned")
    assert math.isclose(s.iloc[0], 16.0)


def test_absolute_dpdl_needs_backbone_and_m(ref):
    def frame(m_max):
        return pd.DataFrame([dict(task="elpv", setting="general", seen_class="all", n_anomalies=m, method="dpdl",
                                  seed=s, auroc=0.937) for m in (m_max, 1) for s in (0, 1)])
    claims = [c for c in fid.DPDL_CLAIMS if c.id == "abs_dpdl_general_m10_elpv"]
    same = fid.fidelity_table(claims, ref, {"05_general_runs": frame(10)}, context={"backbone": "resnet18"})
    assert same.verdict.iloc[0] == "reproduced"
    fewer = fid.fidelity_table(claims, ref, {"05_general_runs": frame(2)}, context={"backbone": "resnet18"})
    assert fewer.verdict.iloc[0] == "not comparable" and "n_anomalies 2 vs the paper's 10" in fewer.why.iloc[0]


# ---------------------------------------------------------------- DeLong with per-image scores

def test_placements_give_the_auroc_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(30), np.zeros(50)]
    scores = np.round(rng.normal(labels, 1.0), 1)  # rounded: ties
    v10, v01 = fid.placements(labels, scores)
    assert v10.mean() == pytest.approx(roc_auc_score(labels, scores))
    assert v01.mean() == pytest.approx(roc_auc_score(labels, scores))


def test_delong_variance_matches_a_bootstrap():
    rng = np.random.default_rng(2)
    labels = np.r_[np.ones(40), np.zeros(60)]
    a = rng.normal(labels * 1.0, 1.0)
    b = a + rng.normal(0, 0.5, a.size)  # correlated with A
    claim = _order(a={"method": "a"}, b={"method": "b"})
    df = pd.DataFrame(dict(method=np.repeat(["a", "b"], a.size), image=np.tile(np.arange(a.size), 2),
                           label=np.tile(labels, 2), score=np.r_[a, b], seed=0))
    se = fid.delong_se(claim, df, ["-"], [0], None)
    diffs = []
    for _ in range(800):
        idx = np.r_[rng.choice(40, 40), 40 + rng.choice(60, 60)]
        va, vb = fid.placements(labels[idx], a[idx]), fid.placements(labels[idx], b[idx])
        diffs.append(100 * (va[0].mean() - vb[0].mean()))
    assert se == pytest.approx(np.std(diffs), rel=0.2)
    # the paired error is far below the unpaired (Hanley-McNeil) one for correlated methods
    unpaired = 100 * math.hypot(fid.auroc_se(fid.placements(labels, a)[0].mean(), 40, 60),
                                fid.auroc_se(fid.placements(labels, b)[0].mean(), 40, 60))
    assert se < 0.8 * unpaired
    # identical methods: no split error at all
    assert fid.delong_se(claim, df.assign(score=np.r_[a, a]), ["-"], [0], None) == 0.0


def test_fidelity_table_uses_per_image_scores(ref):
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(50), np.zeros(50)]
    rows, scores = [], []
    for seed in (0, 1):
        base = rng.normal(labels * 1.5, 1.0)
        for method, shift in (("patchcore", 0.0), ("roda", 0.6)):
            s = base + shift * labels + rng.normal(0, 0.3, labels.size)
            v10, _ = fid.placements(labels, s)
            rows.append(dict(task="t", method=method, condition="gaussian_noise", severity=5, seed=seed,
                             image_auroc=v10.mean()))
            scores += [dict(task="t", method=method, condition="gaussian_noise", severity=5, seed=seed, image=i,
                            label=int(lab), score=x) for i, (lab, x) in enumerate(zip(labels, s))]
    split = pd.DataFrame([dict(task="t", split="target eval", images=100, normal=50, anomalous=50)])
    claims = [c for c in fid.RODA_CLAIMS if c.id == "t1_roda_vs_patchcore_gaussian_noise"]
    results = {"03_roda": pd.DataFrame(rows), "01_target_split": split}
    unpaired = fid.fidelity_table(claims, ref, results).iloc[0]
    paired = fid.fidelity_table(claims, ref, {**results, "03_roda_scores": pd.DataFrame(scores)}).iloc[0]
    assert "paired DeLong" in paired.why and "DeLong" not in unpaired.why
    assert paired.ours_se < unpaired.ours_se
    assert paired.p_value < unpaired.p_value
