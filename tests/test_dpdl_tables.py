"""lib/dpdl/tables.py: notebook 05's tables from per-run rows, on small run tables with known answers."""

import math

import pandas as pd
import pytest

from lib.dpdl import tables


def run(task="t", setting="general", seen="all", m=10, seed=0, method="dpdl", auroc=0.5):
    return dict(task=task, setting=setting, seen_class=seen, n_anomalies=m, seed=seed, train_normal=20,
                train_anomaly=m, seen_classes=seen, test_normal=5, test_anomaly=7, test_classes="a,b",
                method=method, base_method="dpdl", auroc=auroc)


def test_hard_table_averages_the_classes_per_seed_before_the_spread_over_seeds():
    rows = [run(setting="hard", seen="a", seed=0, auroc=0.6), run(setting="hard", seen="b", seed=0, auroc=0.8),
            run(setting="hard", seen="a", seed=1, auroc=1.0), run(setting="hard", seen="b", seed=1, auroc=0.8)]
    table = tables.hard_table(pd.DataFrame(rows))
    per_class = table[table.seen_class == "a"].iloc[0]
    assert per_class["mean"] == pytest.approx(0.8) and per_class["n"] == 2
    mean = table[table.seen_class == "mean"].iloc[0]
    assert mean["mean"] == pytest.approx(0.8)  # seeds' class means 0.7 and 0.9
    assert mean["std"] == pytest.approx(math.sqrt(0.02))  # sample std of (0.7, 0.9), not of the four runs


def test_where_dpdl_wins_ranks_dpdl_and_gives_its_margin_over_the_best_other():
    rows = [run(method="dpdl", auroc=0.7), run(method="dra", auroc=0.8), run(method="flos", auroc=0.6),
            run(m=1, method="dpdl", auroc=0.9), run(m=1, method="dra", auroc=0.85), run(m=1, method="flos", auroc=0.5)]
    wins = tables.where_dpdl_wins(tables.general_table(pd.DataFrame(rows))).set_index("n_anomalies")
    assert wins.loc[10, "dpdl_rank"] == 2 and wins.loc[10, "best_other"] == "dra"
    assert wins.loc[10, "margin"] == pytest.approx(-0.1)
    assert wins.loc[1, "dpdl_rank"] == 1 and wins.loc[1, "margin"] == pytest.approx(0.05)
    assert set(wins.setting) == {"general"}
    with pytest.raises(ValueError, match="'dpdl'"):
        tables.where_dpdl_wins(tables.general_table(pd.DataFrame([run(method="dra")])))


def test_ablation_delta_pairs_each_variant_with_the_full_model_of_the_same_seed():
    rows = [run(seed=0, method="DPDL", auroc=0.8), run(seed=1, method="DPDL", auroc=0.9),
            run(seed=1, method="M_r", auroc=0.95), run(seed=0, method="M_r", auroc=0.7)]  # variant seeds reversed
    ablation, delta = tables.ablation_tables(pd.DataFrame(rows))
    assert set(ablation.method) == {"DPDL", "M_r"}
    row = delta.iloc[0]
    assert row["method"] == "M_r" and row["mean"] == pytest.approx(-0.025)
    assert row["std"] == pytest.approx(math.sqrt(2) * 0.075)  # deltas -0.1 and +0.05 (by position: +0.15, -0.2)
    with pytest.raises(ValueError, match="'DPDL'"):
        tables.ablation_tables(pd.DataFrame(rows).replace({"DPDL": "dpdl"}))


def test_ablation_runs_of_two_schedules_are_grouped_and_paired_within_their_schedule():
    rows = [dict(run(seed=s, method=m, auroc=a), schedule=sch)
            for sch, full, variant in (("10x20x16", 0.8, 0.7), ("50x20x16", 0.9, 0.6))
            for s in (0, 1) for m, a in (("DPDL", full), ("M_r", variant))]
    rows.append(dict(run(seed=0, method="M_a", auroc=0.5), schedule="50x20x16"))
    rows.append(dict(run(seed=0, method="M_n", auroc=0.5), schedule="5x20x16"))  # no full model at its schedule
    ablation, delta = tables.ablation_tables(pd.DataFrame(rows))
    means = delta.set_index(["schedule", "method"])["mean"]
    assert means[("10x20x16", "M_r")] == pytest.approx(-0.1) and means[("50x20x16", "M_r")] == pytest.approx(-0.3)
    assert means[("50x20x16", "M_a")] == pytest.approx(-0.4) and ("5x20x16", "M_n") not in means.index
    assert ablation.set_index(["schedule", "method"]).loc[("50x20x16", "DPDL"), "mean"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="two 'DPDL' runs"):
        tables.ablation_tables(pd.DataFrame(rows + [dict(run(seed=0, method="DPDL"), schedule="10x20x16")]))


def test_protocol_has_one_row_per_split_in_the_order_of_the_runs():
    general = pd.DataFrame([run(seed=s, method=m) for s in (0, 1) for m in ("dpdl", "dra")])
    hard = pd.DataFrame([run(setting="hard", seen="a", method=m) for m in ("dpdl", "dra")])
    protocol = tables.protocol_table(general, hard, pd.DataFrame())
    assert list(protocol.columns) == list(tables.PROTOCOL_COLUMNS)
    assert list(zip(protocol.setting, protocol.seed)) == [("general", 0), ("general", 1), ("hard", 0)]
