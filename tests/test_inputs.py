"""Bad inputs that used to give wrong results with exit code 0 (issue #10): settings, caches, images, labels,
outputs. Every test here failed on the code before the fix."""

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lib.common import cache
from lib.common.data import (
    DataError,
    Sample,
    labelled_folder_samples,
    load_image,
    load_task,
    preprocess,
)
from lib.common.synthetic import make_synthetic_mvtec
from lib.common.utils import OutputError, read_csv, write_csv
from lib.experiments import profiles, roda_steps
from lib.experiments.settings import parse_assignments

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import run_notebooks  # noqa: E402  (scripts/ is not a package)

SettingsError = profiles.SettingsError


@pytest.fixture
def env_set(monkeypatch):
    """``--set`` as run_notebooks hands it to a kernel."""
    def apply(*items):
        monkeypatch.setenv(profiles.OVERRIDES_ENV, json.dumps(parse_assignments(items)))
    monkeypatch.delenv(profiles.OVERRIDES_ENV, raising=False)
    return apply


# ------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(("item", "message"), [
    ("foo.bar=1", "foo.bar: unknown setting"),
    ("roda.epoch=5", "did you mean roda.epochs"),
    ("patchcore.coreset=0.1", "did you mean patchcore.coreset_ratio"),
    ("roda.epochs=abc", r"roda.epochs='abc': must be an integer >= 0, got 'abc' \(str\)"),
    ("patchcore.coreset_ratio=-0.5", r"must be a number in \(0, 1\]"),
    ("roda.epochs=2.5", "must be an integer"),
    ("roda.rule=orr", "did you mean: 'orr' -> 'or'"),
    ('corruption.names=["gausian_noise"]', "'gausian_noise' -> 'gaussian_noise'"),
    ("roda=3", "roda is a section"),
    ("device=cuda", "set by get_profile itself"),
    ("patchcore.batch_size=null", "must be an integer >= 1"),
])
def test_bad_overrides_are_refused_with_the_key_and_the_fix(env_set, item, message):
    env_set(item)
    with pytest.raises(SettingsError, match=message):
        profiles.resolve("smoke", device="cpu")


def test_keyword_overrides_are_checked_too():
    with pytest.raises(SettingsError, match="did you mean roda.epochs"):
        profiles.resolve("smoke", device="cpu", roda={"epoch": 3})
    with pytest.raises(SettingsError, match="unknown profile 'smok'.*did you mean 'smoke'"):
        profiles.resolve("smok")


def test_null_is_a_value(env_set):
    assert profiles.resolve("default", device="cpu").patchcore.max_train == 120
    env_set("patchcore.max_train=null")
    assert profiles.resolve("default", device="cpu").patchcore.max_train is None


def test_profile_is_read_only_and_variants_are_derived():
    cfg = profiles.resolve("smoke", device="cpu")
    for mutate in (lambda: cfg["roda"].__setitem__("epochs", 5), lambda: setattr(cfg.roda, "epochs", 5),
                   lambda: cfg.__setitem__("seeds", (1,)), lambda: cfg.roda.update(epochs=5)):
        with pytest.raises(TypeError, match="read-only.*replace"):
            mutate()
    fast = cfg.replace(roda={"epochs": 7})
    dotted = cfg.replace({"roda.epochs": 7})
    assert fast.roda.epochs == dotted.roda.epochs == 7 and cfg.roda.epochs == 1
    assert fast.roda.batch_size == cfg.roda.batch_size  # the rest of the section is kept
    assert fast.ablation.epochs == 7  # a setting that defaults to roda.epochs follows it
    with pytest.raises(SettingsError, match="roda.epochs=-1"):
        cfg.replace(roda={"epochs": -1})


def test_lists_from_json_become_tuples_and_numbers_are_normalised(env_set):
    env_set("seeds=[3, 4]", "roda.lr=1")
    cfg = profiles.resolve("smoke", device="cpu")
    assert cfg.seeds == (3, 4) and cfg.roda.lr == 1.0 and isinstance(cfg.roda.lr, float)


def test_profiles_are_the_only_source_of_defaults():
    """Every key of every profile has a default in _BASE; the notebooks' own defaults (05, 06) live there."""
    base = dict(profiles._leaves(profiles._BASE))
    for name, prof in profiles.PROFILES.items():
        extra = [k for k, _ in profiles._leaves(prof) if k not in base]
        assert not extra, f"profile {name} has keys without a default in _BASE: {extra}"
    assert set(profiles.SPEC) <= set(base)
    cfg = profiles.resolve("default", device="cpu")
    assert cfg.dpdl.methods == ("dpdl", "devnet", "dra", "flos")
    derived = profiles.resolve("default", device="cpu", dpdl={"hard_seeds": None, "hard_n_anomalies": None,
                                                                "sensitivity_seeds": None})
    assert derived.dpdl.sensitivity_seeds == derived.dpdl.seeds[:3]
    assert derived.dpdl.hard_seeds == derived.dpdl.seeds  # None means: the value of another setting
    assert derived.dpdl.hard_n_anomalies == derived.dpdl.n_anomalies
    assert set(profiles._BASE["dpdl"]["sensitivity"]) == {"n_prototypes", "eps", "kappa", "lam"}
    assert cfg.dpdl.sensitivity  # the default profile sweeps its own subset
    assert cfg.figures.qualitative_rows == 2
    assert profiles.resolve("real_full", device="cpu").figures.qualitative_rows == 4


def test_real_profile_keeps_the_papers_schedules_on_one_category_and_real_full_the_grids():
    """Issue 9: `real` is sized to run in about two hours (one category) without cutting the schedules the
    papers report; the every-category grids are `real_full`'s and write to their own folder."""
    from lib.experiments import drifting_line

    real, full = profiles.resolve("real", device="cpu"), profiles.resolve("real_full", device="cpu")
    assert real.tasks == ("mvtec/bottle",) and real.dpdl.tasks == ("mvtec/bottle",)
    assert real.ablation.epochs == real.roda.epochs == 10 and len(real.ablation.seeds) == 3  # notebook 04
    assert (real.dpdl.epochs, real.dpdl.iterations) == (50, 20) and len(real.dpdl.seeds) == 3
    assert "roda_robust" in real.roda.variants  # notebook 08 compares the leads with it
    assert set(real.roda.variants) < set(full.roda.variants) and len(full.tasks) == 4
    assert Path(real.results_dir).name == "real" and Path(full.results_dir).name == "real_full"
    assert len(drifting_line.line_settings(real)["seeds"]) == 1 and len(drifting_line.line_settings(full)["seeds"]) == 3


def test_config_json_of_a_clone_elsewhere_is_not_other_settings_but_a_changed_value_is(tmp_path):
    """A config.json that records other folders (absolute ones, written by a checkout elsewhere) must not be told
    its settings changed, a changed setting must (profiles.WHERE)."""
    import warnings

    cfg = profiles.get_profile("smoke", device="cpu", out_dir=tmp_path)
    path = tmp_path / "results" / "smoke" / "config.json"
    saved = json.loads(path.read_text())
    saved.update({key: f"/elsewhere/{key}" for key in profiles.WHERE})
    path.write_text(json.dumps(saved))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        profiles.save_config(cfg)
    saved["roda"]["epochs"] = 7
    path.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"described other settings \(roda.epochs\)"):
        profiles.save_config(cfg)


def test_resolved_configuration_is_saved_next_to_the_results(tmp_path, env_set):
    env_set("patchcore.coreset_ratio=0.2")
    cfg = profiles.get_profile("smoke", device="cpu", out_dir=tmp_path)
    saved = json.loads((tmp_path / "results" / "smoke" / "config.json").read_text())
    assert saved["patchcore"]["coreset_ratio"] == 0.2 and saved["name"] == "smoke"
    assert saved["roda"] == json.loads(json.dumps(cfg.roda))
    env_set("patchcore.coreset_ratio=0.3")
    with pytest.warns(UserWarning, match="patchcore.coreset_ratio"):
        profiles.get_profile("smoke", device="cpu", out_dir=tmp_path)


def test_the_runner_offers_every_profile():
    assert set(run_notebooks.PROFILE_NAMES) == set(profiles.PROFILES)


def test_run_notebooks_refuses_bad_settings_before_any_kernel(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_notebooks, "run_one", lambda *a, **k: pytest.fail("a notebook ran"))
    monkeypatch.delenv(profiles.OVERRIDES_ENV, raising=False)
    for bad in (["--set", "roda.epoch=5"], ["--set", "roda.epochs=abc"], ["--data-root", str(tmp_path / "nope")],
                ["--out-dir", str(tmp_path / "file.txt")]):
        (tmp_path / "file.txt").write_text("not a folder")
        with pytest.raises(SystemExit) as exit_info:
            run_notebooks.main(["--profile", "smoke", "--device", "cpu", "--out-dir", str(tmp_path / "out"), *bad])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "did you mean roda.epochs" in err and "roda.epochs='abc'" in err and "no such folder" in err
    assert "cannot write to the results folder" in err


def test_run_notebooks_checks_the_data_before_any_kernel_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """An unknown category, a wrong layout, an empty root, a bad labels.csv: found before a kernel starts (they were
    found 20-37 s into the first notebook, after config.json and summary.csv were written), and the categories
    found under the root are listed, nested mvtec/ included."""
    monkeypatch.setattr(run_notebooks, "run_one", lambda *a, **k: pytest.fail("a notebook ran"))
    monkeypatch.delenv(profiles.OVERRIDES_ENV, raising=False)
    root = tmp_path / "data"
    make_synthetic_mvtec(root / "mvtec", "bottle", n_train=2, n_test_good=1, n_test_defect=1, size=64)
    (root / "mvtec" / "flat" / "test" / "good").mkdir(parents=True)
    _labelled(root / "lab", ["0.png,0,good,", "1.png,2,x,"])
    (tmp_path / "empty").mkdir()
    cases = ((root, "bottel", "Did you mean 'bottle'? Categories there: ['bottle']"),
             (root, "flat", "wrong layout"),
             (tmp_path / "empty", "bottle", "Categories there: none"),
             (root, "lab", "line 3: label must be 0 (normal) or 1 (anomalous)"))
    for data_root, category, message in cases:
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            run_notebooks.main(["--profile", "smoke", "--device", "cpu", "--only", "02", "--out-dir", str(out),
                                "--data-root", str(data_root), "--categories", category])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
        assert not out.exists()  # no config.json, no summary.csv, no executed copy


def test_run_notebooks_suggests_the_profile(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_notebooks.main(["--profile", "smok"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown profile 'smok'" in err and "(did you mean 'smoke'?)" in err


def test_run_notebooks_writes_its_summary_even_when_a_notebook_fails(tmp_path, monkeypatch):
    """runs/<profile>/summary.csv: one row per notebook with its status and minutes; a failure stops the
    run, and the rows after it say "not run"."""
    calls = []

    def fake_run(nb, out, params, timeout, progress=False):
        calls.append(nb.name)
        if len(calls) == 2:
            raise SystemExit(f"{nb.name} failed")
        return 90.0

    monkeypatch.setattr(run_notebooks, "run_one", fake_run)
    monkeypatch.delenv(profiles.OVERRIDES_ENV, raising=False)
    out = tmp_path / "out"
    assert run_notebooks.main(["--profile", "smoke", "--device", "cpu", "--only", "01", "--out-dir", str(out)]) == 0
    first = pd.read_csv(out / "runs" / "smoke" / "summary.csv")
    assert first[["notebook", "status", "minutes"]].values.tolist() == [["01_corruptions.ipynb", "ok", 1.5]]
    calls.clear()
    with pytest.raises(SystemExit):
        run_notebooks.main(["--profile", "smoke", "--device", "cpu", "--only", "01", "02", "03",
                            "--out-dir", str(out)])
    summary = pd.read_csv(out / "runs" / "smoke" / "summary.csv")
    assert summary.status.tolist() == ["ok", "FAILED", "not run"]
    assert summary.minutes.iloc[0] == 1.5 and summary.minutes.iloc[1] >= 0 and pd.isna(summary.minutes.iloc[2])


# ------------------------------------------------------------------------------------------------- outputs


def test_unwritable_output_folder_fails_at_start_with_a_clear_message(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OutputError, match=f"cannot write to the results folder {blocker}.*out_dir"):
        profiles.get_profile("smoke", device="cpu", out_dir=blocker)


def test_files_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_csv(pd.DataFrame(dict(a=[1])), tmp_path / "t.csv")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_timing_columns_go_to_a_separate_file(tmp_path):
    df = pd.DataFrame(dict(task=["a", "b"], image_auroc=[0.5, 0.75], adapt_seconds=[1.23, 4.56], seconds=[1.0, 2.0]))
    write_csv(df, tmp_path / "03_roda.csv")
    table = pd.read_csv(tmp_path / "03_roda.csv")
    timings = pd.read_csv(tmp_path / "03_roda_timings.csv")
    assert list(table.columns) == ["task", "image_auroc"]
    assert list(timings.columns) == ["task", "adapt_seconds", "seconds"]
    assert timings.adapt_seconds.tolist() == [1.23, 4.56]


def test_read_csv_joins_the_timings_back_only_when_they_belong_to_the_table(tmp_path):
    """A resumed grid rewrites its table from what it read: the finished rows keep their wall-clock times."""
    df = pd.DataFrame(dict(task=["a", "b"], seed=[0, 1], diverged=["", ""], image_auroc=[0.5, 0.75],
                           adapt_seconds=[1.23, 4.56]))
    path = write_csv(df, tmp_path / "08_grid.csv")
    back = read_csv(path)
    assert back.adapt_seconds.tolist() == [1.23, 4.56] and back.image_auroc.tolist() == [0.5, 0.75]
    write_csv(back, path)  # the rewrite of a resumed run
    assert pd.read_csv(tmp_path / "08_grid_timings.csv").adapt_seconds.tolist() == [1.23, 4.56]
    # a timings file of other rows (another run's, or out of order) is not glued on
    write_csv(df.iloc[::-1].reset_index(drop=True), tmp_path / "other.csv")
    (tmp_path / "other_timings.csv").replace(tmp_path / "08_grid_timings.csv")
    assert "adapt_seconds" not in read_csv(path).columns
    (tmp_path / "08_grid_timings.csv").unlink()
    assert list(read_csv(path).columns) == ["task", "seed", "diverged", "image_auroc"]


# -------------------------------------------------------------------------------------------------- caches


@pytest.fixture
def synth_root(tmp_path):
    return make_synthetic_mvtec(tmp_path / "data", n_train=4, n_test_good=2, n_test_defect=2, size=64)


def _cfg(tmp_path, **patchcore):
    pc = dict(coreset_ratio=0.1, max_bank=None, max_train=None, max_test=None, batch_size=4)
    pc.update(patchcore)
    return dict(cache_dir=str(tmp_path / "cache"), device="cpu", patchcore=pc)


def test_bank_cache_is_keyed_by_data_and_settings(tmp_path, synth_root, tiny_extractor):
    task = load_task("mvtec/synthetic", synth_root)
    _, info = roda_steps.fit_or_load_bank(_cfg(tmp_path), task, tiny_extractor)
    assert not info["cached"]
    _, info = roda_steps.fit_or_load_bank(_cfg(tmp_path), task, tiny_extractor)
    assert info["cached"]
    model, info = roda_steps.fit_or_load_bank(_cfg(tmp_path, coreset_ratio=0.3), task, tiny_extractor)
    assert not info["cached"] and model.coreset_ratio == 0.3  # another ratio: rebuilt, not the old bank
    # the same category under another data root: the new images are read
    other = shutil.copytree(synth_root, tmp_path / "other")
    task2 = load_task("mvtec/synthetic", other)
    _, info = roda_steps.fit_or_load_bank(_cfg(tmp_path, coreset_ratio=0.3), task2, tiny_extractor)
    assert not info["cached"]
    # an edited training image
    img = Path(task2.train[0].path)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img)
    _, info = roda_steps.fit_or_load_bank(_cfg(tmp_path, coreset_ratio=0.3), task2, tiny_extractor)
    assert not info["cached"]
    # other backbone weights under the same name
    with torch.no_grad():
        next(tiny_extractor.parameters()).add_(1.0)
    _, info = roda_steps.fit_or_load_bank(_cfg(tmp_path, coreset_ratio=0.3), task2, tiny_extractor)
    assert not info["cached"]


def test_cache_file_holds_its_key(tmp_path):
    path = tmp_path / "f.pt"
    calls = []
    build = lambda: calls.append(1) or {"x": torch.arange(3)}
    a = cache.cached(path, cache.content_key(a=1, b=[1, 2]), build)
    b = cache.cached(path, cache.content_key(b=(1, 2), a=1), build)  # same parts, other order: reused
    assert len(calls) == 1 and torch.equal(a["x"], b["x"])
    reasons = []
    cache.cached(path, cache.content_key(a=2, b=[1, 2]), build, on_miss=reasons.append)
    assert len(calls) == 2 and "other data or settings" in reasons[0]
    path.write_bytes(b"garbage")
    with pytest.raises(cache.CacheMiss, match="unreadable"):
        cache.read(path, "k")


def test_shifted_images_are_cached_and_identical(synth_root):
    task = load_task("mvtec/synthetic", synth_root)
    samples = list(task.test)
    store = cache.ImageCache()
    plain = roda_steps.AnomalyDataset(samples, corruption="gaussian_noise", severity=3, seed=1, **task.geometry())
    cached = roda_steps.AnomalyDataset(samples, corruption="gaussian_noise", severity=3, seed=1, cache=store,
                                     **task.geometry())
    first = [cached[i]["image"] for i in range(len(samples))]
    assert store.misses == len(samples) and store.hits == 0
    again = [cached[i]["image"] for i in range(len(samples))]
    assert store.hits == len(samples)
    for a, b, c in zip(first, again, (plain[i]["image"] for i in range(len(samples)))):
        assert torch.equal(a, b) and torch.equal(a, c)
    other_seed = roda_steps.AnomalyDataset(samples, corruption="gaussian_noise", severity=3, seed=2, cache=store,
                                         **task.geometry())
    assert not torch.equal(other_seed[0]["image"], first[0])


# ---------------------------------------------------------------------------------------- images and labels


def test_16_bit_grey_keeps_its_intensities(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb.shape == (64, 64, 3)
    np.testing.assert_allclose(rgb[0, :, 0], np.rint(ramp[0] / 257.0), atol=1)  # not a white image


def test_rgba_palette_and_grey_alpha_become_rgb(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 20:, 3] = 255  # left half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(load_image(tmp_path / "rgba.png"))
    assert out[:, :20].max() == 0 and (out[:, 20:, 0] == 200).all()
    Image.fromarray(rgba, "RGBA").convert("LA").save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png"))[:, :20].max() == 0
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png"))[0, 0].tolist() == [10, 20, 30]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").size == (40, 80)


def test_a_truncated_image_is_one_error_naming_the_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "n.png").write_text("not an image")
    for name in ("t.png", "n.png"):
        with pytest.raises(DataError, match=f"cannot read image .*{name}.*damaged"):
            load_image(tmp_path / name)
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    with pytest.raises(DataError, match="cannot read image .*t.png"):  # a damaged mask, too
        preprocess(Sample(str(tmp_path / "ok.png"), 1, "x", str(tmp_path / "t.png")), 64, None)


def _labelled(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.new("RGB", (40, 40), (i * 40,) * 3).save(folder / f"{i}.png")
    (folder / "labels.csv").write_text("image,label,defect,mask\n" + "".join(f"{r}\n" for r in rows))
    return folder


@pytest.mark.parametrize(("bad", "where"), [("2.png,2,x,", "line 4: label must be 0 .* got '2'"),
                                        ("2.png,bad,x,", "line 4: label must be 0 .* got 'bad'"),
                                        (",1,x,", "line 4: the image column is empty")])
def test_labels_are_checked_with_the_row(tmp_path, bad, where):
    folder = _labelled(tmp_path / "d", ["0.png,0,,", "1.png,1,crack,", bad])
    with pytest.raises(DataError, match=where):
        labelled_folder_samples(folder)


def test_labelled_folder_is_recognised_by_labels_csv_not_by_name(tmp_path):
    _labelled(tmp_path / "my_parts", ["0.png,0,,", "1.png,0,,", "2.png,1,crack,", "3.png,0,,"])
    cfg = profiles.resolve("default", device="cpu", data_root=tmp_path, categories="my_parts,screw")
    assert cfg.tasks == ("my_parts", "mvtec/screw")
    task = load_task("my_parts", tmp_path)
    assert len(task.train) + len(task.test) == 4
    by_path = profiles.resolve("default", device="cpu", categories=str(tmp_path / "my_parts"))
    assert by_path.tasks == (str((tmp_path / "my_parts").resolve()),)
    assert len(load_task(by_path.tasks[0]).test) == len(task.test)


def test_smoke_profile_never_writes_into_the_users_data_root(tmp_path):
    user = tmp_path / "my_data"
    user.mkdir()
    cfg = profiles.resolve("smoke", device="cpu", data_root=user, out_dir=tmp_path / "out")
    assert cfg.data_root == str(user)
    assert str(profiles.data_root_for(cfg, "synthetic")).startswith(str(tmp_path / "out"))
    assert str(profiles.data_root_for(cfg, "synthetic_labelled")).startswith(str(tmp_path / "out"))
    assert list(user.iterdir()) == []


# ------------------------------------------------------------------------------------------ reproducibility


@pytest.mark.notebook
def test_smoke_profile_reruns_bit_identical(tmp_path, monkeypatch):
    """Two smoke runs of notebooks 01-03 with the same seed: every CSV equal byte for byte."""
    monkeypatch.delenv(profiles.OVERRIDES_ENV, raising=False)
    for run in ("a", "b"):
        assert run_notebooks.main(["--profile", "smoke", "--device", "cpu", "--seed", "0", "--only", "01", "02", "03",
                                   "--out-dir", str(tmp_path / run)]) == 0
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "results").rglob("*.csv"))
    b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b" / "results").rglob("*.csv"))
    assert a == b and len(a) >= 6
    differ = [str(p) for p in a if "_timings" not in p.name and
              (tmp_path / "a" / p).read_bytes() != (tmp_path / "b" / p).read_bytes()]
    assert not differ, f"CSVs that differ between two runs with the same seed: {differ}"


def test_seeding_selects_deterministic_kernels():
    """The backward of ``x[rows]`` with repeated rows (the RoDA loss) accumulates with atomic adds on CPU
    unless torch's deterministic algorithms are on: with two threads its last bits changed between runs."""
    from lib.common.utils import seed_everything

    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        seed_everything(0)
        assert torch.are_deterministic_algorithms_enabled()
        # ... without the NaN fill of every new tensor that the switch also turns on (a third of a RoDA step)
        assert not torch.utils.deterministic.fill_uninitialized_memory
        x = torch.randn(64, 32, requires_grad=True)
        rows = torch.randint(0, 64, (20000,), generator=torch.Generator().manual_seed(0))
        grads = []
        for _ in range(3):
            x.grad = None
            (x[rows] * torch.linspace(0, 1, 32)).sum().backward()
            grads.append(x.grad.clone())
        assert all(torch.equal(grads[0], g) for g in grads[1:])
    finally:
        torch.use_deterministic_algorithms(before)


def test_feature_cache_key_follows_files_shift_and_weights(synth_root, tiny_extractor, tmp_path):
    from lib.roda.patchcore import PatchCore

    task = load_task("mvtec/synthetic", synth_root)
    model = PatchCore(tiny_extractor, device="cpu")
    key = lambda *a: roda_steps.features_key(model, task, list(task.test), *a)
    assert key("contrast", 5, 0) == key("contrast", 5, 0)
    assert len({key("contrast", 5, 0), key("contrast", 4, 0), key("contrast", 5, 1), key(None, 5, 0)}) == 4
    assert key(None, 5, 0) == key(None, 5, 1)  # clean images do not depend on the shift seed
    before = key("contrast", 5, 0)
    with torch.no_grad():
        tiny_extractor.stem[2].weight.mul_(1.5)  # an adapted BatchNorm affine parameter
    assert key("contrast", 5, 0) != before


def test_a_list_given_as_text_says_how_to_write_it(env_set):
    env_set("tasks=ksdd")
    with pytest.raises(SettingsError, match=r"tasks='ksdd': must be a non-empty list of strings.*KEY=\[\"ksdd\"\]"):
        profiles.resolve("smoke", device="cpu")


def test_backbone_fingerprint_ignores_modules_no_tap_uses(tiny_extractor):
    """A bundled network's unused classifier is freshly initialised in every process: it must not change
    the key (else every bank is rebuilt), while a weight the taps use must."""
    from conftest import TinyExtractor

    a, b = TinyExtractor(), TinyExtractor()
    a.head_fc, b.head_fc = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)  # never run by forward
    with torch.no_grad():
        b.head_fc.weight.add_(1.0)
    assert cache.extractor_fingerprint(a) == cache.extractor_fingerprint(b)
    with torch.no_grad():
        b.deep[0].weight.add_(1e-3)
    assert cache.extractor_fingerprint(a) != cache.extractor_fingerprint(b)


def test_recorded_section_knows_when_the_run_wrote_the_recorded_file(tmp_path):
    """A "what we measured" section reads results/real_full/<table>; a real_full run writes that very file
    first, and must then not show its fresh table under the recorded label (notebooks 03 and 08)."""
    from lib.experiments import profiles
    from lib.reporting import figures

    real = profiles.resolve("real_full", device="cpu")
    recorded = Path(real.results_dir) / "03_roda.csv"
    assert figures.written_by_this_run(recorded, real.results_dir)
    assert figures.written_by_this_run(tmp_path / "r" / ".." / "x.csv", tmp_path)  # the same folder, spelled apart
    other = profiles.resolve("real_full", device="cpu", out_dir=tmp_path)  # e.g. a one-category render to /tmp
    assert not figures.written_by_this_run(recorded, other.results_dir)
