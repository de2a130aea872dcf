

def test_versus_reference_counts_cells_above_and_below():
    import pandas as pd

    from lib.experiments.roda_grid import versus_reference

    rows = []
    for cond, pc, ours in (("noise", 0.5, 0.7), ("blur", 0.8, 0.6), ("contrast", 0.6, 0.61)):
        for seed, jitter in ((0, 0.0), (1, 0.02)):
            rows += [dict(task="t", condition=cond, method="patchcore", seed=seed, image_auroc=pc, pixel_auroc=pc),
                     dict(task="t", condition=cond, method="roda", seed=seed, image_auroc=ours + jitter,
                          pixel_auroc=ours - jitter)]
    out = versus_reference(pd.DataFrame(rows), margin=0.05).set_index("method").loc["roda"]
    assert out.cells == 3 and out.pixel_above == 1 and out.pixel_below == 1  # contrast is inside the margin
    assert abs(out.pixel_mean_diff - ((0.19 - 0.21 + 0.0) / 3)) < 1e-9
    assert abs(out.pixel_worst_diff + 0.21) < 1e-9  # blur: (0.6 + 0.58) / 2 - 0.8
    assert abs(out.pixel_std_diff - pd.Series([0.19, -0.21, 0.0]).std()) < 1e-9  # over the cells
    # over the seeds: seed 0's mean difference (0.2 - 0.2 + 0.01) / 3, seed 1's (0.18 - 0.22 - 0.01) / 3
    assert out.seeds == 2 and abs(out.pixel_seed_std - pd.Series([0.01 / 3, -0.05 / 3]).std()) < 1e-9


def test_files_beside_the_bank_are_reused_only_for_the_same_bank(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from lib.experiments import roda_grid as roda_runner

    monkeypatch.setattr(roda_runner, "bank_path", lambda cfg, task, name, seed: tmp_path / "bank_s0.pt")
    model = SimpleNamespace(bank=torch.arange(12.0).reshape(6, 2), extractor=SimpleNamespace(name="net"))
    calls = []

    def compute():
        calls.append(1)
        return torch.full((3,), float(len(calls)))

    first = roda_runner._beside_bank(None, None, model, 0, ".w.pt", compute)
    again = roda_runner._beside_bank(None, None, model, 0, ".w.pt", compute)
    assert (tmp_path / "bank_s0.w.pt").exists() and len(calls) == 1 and torch.equal(first, again)
    model.bank = model.bank + 1  # another bank: the file is stale
    assert torch.equal(roda_runner._beside_bank(None, None, model, 0, ".w.pt", compute), torch.full((3,), 2.0))
    model.bank = model.bank[:5]  # another size
    roda_runner._beside_bank(None, None, model, 0, ".w.pt", compute)
    roda_runner._beside_bank(None, None, model, 0, ".w.pt", compute, use_cache=False)
    assert len(calls) == 4


def test_epoch_curve_starts_from_the_statistics_it_aligns_from(tmp_path):
    """Epoch 0 of a curve is the state the alignment starts from: with bn_init='matched' it is the matched
    statistics (the adabn_matched row), not the source encoder; the source scores come along as reference."""
    from lib.common import backbones
    from lib.experiments import profiles
    from lib.experiments import roda_grid as roda_runner
    from lib.experiments.roda_steps import fit_or_load_bank, resolve_task, target_split

    cfg = profiles.get_profile("smoke", device="cpu", out_dir=tmp_path)
    extractor = backbones.load_backbone(cfg.backbone, weights=cfg.backbone_weights, device="cpu")
    task_name, corruption = cfg["tasks"][0], "contrast"
    spec = dict(method="roda", bn_init="matched")
    curve = roda_runner.epoch_curve(cfg, extractor, task_name, corruption, spec, seed=0, epochs=2)
    assert list(curve.epoch) == [0, 1, 2] and set(curve.start) == {"matched"}
    t = resolve_task(cfg, task_name)
    model, _ = fit_or_load_bank(cfg, t, extractor, seed=0)
    a_split, e_split = target_split(t, cfg["corruption"]["adapt_fraction"], 0)
    severity, batch = cfg["corruption"]["severity"], cfg["patchcore"]["batch_size"]
    conf = roda_runner.config_for(cfg, dict(method="patchcore", bn_init="matched"), 0)
    stats, _ = roda_runner.adapt_and_evaluate(model, t, a_split, e_split, corruption, severity, conf, eval_seed=0,
                                              batch_size=batch,
                                              bn_reference=roda_runner.training_bn_moments(cfg, t, model))
    source, _ = roda_runner.adapt_and_evaluate(model, t, a_split, e_split, corruption, severity,
                                               roda_runner.config_for(cfg, dict(method="patchcore"), 0),
                                               eval_seed=0, batch_size=batch)
    assert curve.pixel_auroc.iloc[0] == stats["pixel_auroc"] != source["pixel_auroc"]
    assert (curve.source_pixel_auroc == source["pixel_auroc"]).all()
    import pandas as pd

    from lib.reporting import figures

    two = pd.concat([curve.assign(method="roda"), curve.assign(method="other", condition="noise")])
    fig = figures.epoch_curves(two)  # one panel per task x corruption
    assert sum(ax.axison for ax in fig.axes) == 2


def test_epoch_curve_of_a_task_without_masks_is_numeric_and_plots(tmp_path, monkeypatch):
    """A task without masks scores pixel AUROC as None (ELPV): the curve keeps numeric NaN columns, so its
    plot and the per-epoch tables work (notebook 08 stopped at this plot on the default profile)."""
    import math

    from lib.common import backbones
    from lib.experiments import profiles
    from lib.experiments import roda_grid as roda_runner
    from lib.reporting import figures

    real_evaluate = roda_runner.evaluate

    def maskless(*args, **kwargs):
        return {**real_evaluate(*args, **kwargs), "pixel_auroc": None}

    monkeypatch.setattr(roda_runner, "evaluate", maskless)
    cfg = profiles.get_profile("smoke", device="cpu", out_dir=tmp_path)
    extractor = backbones.load_backbone(cfg.backbone, weights=cfg.backbone_weights, device="cpu")
    curve = roda_runner.epoch_curve(cfg, extractor, cfg["tasks"][0], "contrast", dict(method="roda"), seed=0,
                                    epochs=1)
    for col in ("image_auroc", "pixel_auroc", "source_pixel_auroc"):
        assert curve[col].dtype.kind == "f", col
    assert curve.pixel_auroc.isna().all() and not curve.image_auroc.isna().any()
    assert not math.isnan(curve.nn_distance.iloc[-1])
    fig = figures.epoch_curves(curve.assign(method="roda"))
    assert sum(ax.axison for ax in fig.axes) == 1


def test_slow_variants_are_one_change_away_from_their_parents(tmp_path):
    """`*_slow` differs from its parent only in the step size (and, for the robust one, the paper's fixed
    epochs instead of the stop rule); `roda_matched_slow` from the paper's `roda` only in lr and bn_init."""
    from dataclasses import asdict

    from lib.experiments.profiles import SLOW_LR, get_profile
    from lib.experiments.roda_grid import config_for, method_specs

    cfg = get_profile("elpv", out_dir=tmp_path)
    specs = method_specs(cfg)

    def diff(a, b):
        x, y = asdict(config_for(cfg, specs[a], 0)), asdict(config_for(cfg, specs[b], 0))
        return {k: (x[k], y[k]) for k in x if x[k] != y[k]}

    stop = {"rel_tol": 0.01, "min_epochs": 2}
    assert diff("roda_robust_matched_slow", "roda_robust_matched") == {"lr": (SLOW_LR, 0.003), "stop": (None, stop)}
    assert diff("roda_matched_slow", "roda") == {"lr": (SLOW_LR, 0.003), "bn_init": ("matched", "source")}
    assert diff("roda_slow", "roda") == {"lr": (SLOW_LR, 0.003)}
    assert diff("roda_robust_gated_slow", "roda_robust_matched_slow") == {"bn_init": ("gated", "matched")}
    assert config_for(cfg, specs["roda_robust_matched_slow"], 0).epochs == cfg["roda"]["epochs"]  # no stop rule


def test_a_resumed_grid_keeps_the_timings_of_its_finished_rows(tmp_path):
    """run_grid skips the rows already in its table and rewrites the table with the new ones: the finished
    rows' wall-clock times (kept apart in ``*_timings.csv``) must survive that rewrite. A gated row records
    which statistics its gate kept and the two distances it compared."""
    import pandas as pd

    from lib.common import backbones
    from lib.experiments import profiles
    from lib.experiments import roda_grid as roda_runner

    cfg = profiles.get_profile("smoke", device="cpu", out_dir=tmp_path)
    extractor = backbones.load_backbone(cfg.backbone, weights=cfg.backbone_weights, device="cpu")
    out = tmp_path / "grid.csv"
    methods = {"patchcore": dict(method="patchcore"), "adabn_gated": dict(method="patchcore", bn_init="gated")}
    roda_runner.run_grid(cfg, extractor, cfg["tasks"], ["contrast"], methods, [0], out)
    roda_runner.run_grid(cfg, extractor, cfg["tasks"], ["contrast"], methods, [0, 1], out)
    times = pd.read_csv(tmp_path / "grid_timings.csv")
    assert list(times.seed) == [0, 0, 1, 1] and times.adapt_seconds.notna().all()
    gated = pd.read_csv(out).query("method == 'adabn_gated'")
    assert set(gated.bn_start) <= {"matched", "source"} and len(gated) == 2
    assert ((gated.bn_start == "matched") == (gated.nn_matched < gated.nn_source)).all()
