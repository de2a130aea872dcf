"""The `roda` command line on a tiny generated MVTec-layout set (64 px, one batch per command)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.common.folders import list_images, read_rgb
from lib.common.synthetic import make_synthetic_mvtec
from lib.experiments.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_synthetic_mvtec(root / "mvtec", "synthetic", n_train=8, n_test_good=4, n_test_defect=4, size=64)
    category = root / "mvtec" / "synthetic"
    bank = root / "bank.pt"
    rc = main(["fit", str(category / "train" / "good"), "-o", str(bank), "--resize", "64", "--crop", "none",
               "--coreset-ratio", "0.2", "--device", "cpu", "-q"])
    assert rc == EXIT_OK
    return dict(root=root, category=category, bank=bank)


def test_fit_writes_a_loadable_bank(data):
    import torch

    blob = torch.load(data["bank"], weights_only=False)
    assert blob["bank"].shape == (102, 256)  # 20% of 8 images x 8 x 8 patches
    assert blob["meta"]["preprocessing"]["backbone"] == "mobilenet_v2"
    assert blob["meta"]["preprocessing"]["resize"] == 64


def test_adapt_score_evaluate(data, tmp_path, capsys):
    state = tmp_path / "adapted.pt"
    target = data["category"] / "test"
    assert main(["adapt", str(data["bank"]), str(target), "-o", str(state), "--epochs", "1", "--batch-size", "4",
                 "--variant", "none", "--option", "eps=0.1", "--device", "cpu", "-q"]) == EXIT_OK
    assert state.is_file()
    out = tmp_path / "scores"
    assert main(["score", str(data["bank"]), str(target), "--state", str(state), "-o", str(out),
                 "--threshold", "5", "--device", "cpu", "-q"]) == EXIT_OK
    table = pd.read_csv(out / "scores.csv")
    assert len(table) == 8 and set(table.columns) == {"path", "score", "anomalous", "map"}
    assert (out / "maps" / "good" / "000.png").is_file() and (out / table["map"][0]).is_file()
    with Image.open(out / table["map"][0]) as im:
        assert im.size == (64 * 2 + 4, 64)  # image | overlay
    assert main(["evaluate", str(data["bank"]), str(data["category"]), "--device", "cpu", "-q",
                 "--json", str(tmp_path / "summary.json")]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "image AUROC" in printed and "pixel AUROC" in printed
    summary = pd.read_json(tmp_path / "summary.json", typ="series")
    assert summary["layout"] == "mvtec" and 0.0 <= summary["image_auroc"] <= 1.0


def test_adapted_state_changes_scores_and_source_does_not(data, tmp_path):
    target = data["category"] / "test"
    state = tmp_path / "a.pt"
    main(["adapt", str(data["bank"]), str(target), "-o", str(state), "--steps", "2", "--lr", "0.05",
          "--batch-size", "8", "--device", "cpu", "-q"])
    runs = {}
    for name, extra in (("src", []), ("src2", []), ("ada", ["--state", str(state)])):
        main(["score", str(data["bank"]), str(target), "-o", str(tmp_path / name), "--no-maps", "-q", *extra])
        runs[name] = pd.read_csv(tmp_path / name / "scores.csv")["score"].to_numpy()
    np.testing.assert_allclose(runs["src"], runs["src2"])  # deterministic
    assert np.abs(runs["src"] - runs["ada"]).max() > 1e-4


def test_evaluate_good_vs_other_folders(data, tmp_path, capsys):
    folder = tmp_path / "mine"
    shutil.copytree(data["category"] / "test" / "good", folder / "good")
    shutil.copytree(data["category"] / "test" / "scratch", folder / "bad" / "nested")
    assert main(["evaluate", str(data["bank"]), str(folder), "-q", "-o", str(tmp_path / "e.csv")]) == EXIT_OK
    assert "good/ vs. other folders" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "e.csv")["label"].tolist().count(1) == 2


def test_any_image_format_is_read(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (40, 50), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.bmp")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "rgb.jpg")
    rgba = rng.integers(0, 255, (40, 50, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    (tmp_path / "sub").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "sub" / "rgba.png")
    sixteen = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    import tifffile

    tifffile.imwrite(tmp_path / "deep_rgb.tif", np.full((40, 50, 3), 65535, np.uint16))
    (tmp_path / ".hidden.png").write_bytes(b"")
    found = [p.name for p in list_images(tmp_path)]
    assert found == ["deep.png", "deep_rgb.tif", "grey.bmp", "rgb.jpg", "rgba.png"]
    for p in list_images(tmp_path):
        im = read_rgb(p)
        assert im.mode == "RGB" and im.size == (50, 40)
    assert np.asarray(read_rgb(tmp_path / "sub" / "rgba.png")).max() == 0  # transparent onto black
    deep = np.asarray(read_rgb(tmp_path / "deep.png"))[..., 0].astype(int)
    assert deep.max() == round(int(sixteen.max()) * 255 / 65535) and deep.min() == 0  # scaled, not clipped
    assert np.asarray(read_rgb(tmp_path / "deep_rgb.tif")).min() == 255


def test_mixed_formats_and_sizes(data, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16)).save(folder / "b.png")
    out = tmp_path / "out"
    assert main(["score", str(data["bank"]), str(folder), "-o", str(out), "-q"]) == EXIT_OK
    assert sorted(pd.read_csv(out / "scores.csv")["map"]) == ["maps/a.jpg.png", "maps/a.png", "maps/b.png"]
    # the bank keeps the whole image (--crop none): 64x64 and 64x80 cannot share a batch
    Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(folder / "c.png")
    assert main(["score", str(data["bank"]), str(folder), "-o", str(out), "-q", "--no-maps"]) == EXIT_FAILURE
    assert "differ in size" in capsys.readouterr().err


def test_empty_folder_fails_with_message(data, tmp_path, capsys):
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    assert main(["fit", str(tmp_path / "empty"), "-o", str(tmp_path / "b.pt"), "-q"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "no images" in err and "empty" in err
    assert not (tmp_path / "b.pt").exists()


def test_unreadable_file_stops_or_is_skipped(data, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(data["category"] / "test" / "good", folder)
    (folder / "broken.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "tiny.png")
    out = tmp_path / "out"
    assert main(["score", str(data["bank"]), str(folder), "-o", str(out), "-q"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "broken.png" in err and "tiny.png" in err and "--on-error skip" in err
    assert not (out / "scores.csv").exists()
    assert main(["score", str(data["bank"]), str(folder), "-o", str(out), "--on-error", "skip", "--no-maps"]) == EXIT_OK
    assert "skipped" in capsys.readouterr().err
    assert len(pd.read_csv(out / "scores.csv")) == 4


def test_wrong_bank_and_state_fail_with_message(data, tmp_path, capsys):
    folder = data["category"] / "test"
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    assert main(["score", str(junk), str(folder), "-o", str(tmp_path / "o")]) == EXIT_FAILURE
    assert "not a PatchCore bank" in capsys.readouterr().err
    args = ["score", str(data["bank"]), str(folder), "-o", str(tmp_path / "o"), "--state", str(junk)]
    assert main(args) == EXIT_FAILURE
    assert "roda adapt" in capsys.readouterr().err
    # a bank whose backbone identity does not match its recorded backbone
    import torch

    blob = torch.load(data["bank"], weights_only=False)
    blob["meta"]["backbone"]["weights"] = "something-else"
    torch.save(blob, tmp_path / "other.pt")
    assert main(["evaluate", str(tmp_path / "other.pt"), str(data["category"])]) == EXIT_FAILURE
    assert "another backbone" in capsys.readouterr().err


def test_usage_errors_exit_2(data, tmp_path, capsys):
    assert main(["fit", str(tmp_path / "missing"), "-o", str(tmp_path / "b.pt")]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["adapt", str(data["bank"]), str(tmp_path), "-o", "x.pt", "--method", "nope"])
    assert exc.value.code == EXIT_USAGE
    assert main(["adapt", str(data["bank"]), str(data["category"] / "test"), "-o", str(tmp_path / "s.pt"),
                 "--option", "epsilon=1", "-q"]) == EXIT_USAGE
    assert "takes no option 'epsilon'; did you mean eps?" in capsys.readouterr().err


def test_help_on_every_command(capsys):
    for cmd in (["fit"], ["adapt"], ["score"], ["evaluate"]):
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == EXIT_OK and f"usage: roda {cmd[0]}" in capsys.readouterr().out
    res = subprocess.run([sys.executable, "-m", "lib.experiments.cli", "--help"], capture_output=True, text=True,
                         cwd=REPO,
                         timeout=120, check=False)
    assert res.returncode == 0 and "usage: roda" in res.stdout and "adapt" in res.stdout
    res = subprocess.run([sys.executable, "-m", "lib.experiments.cli"], capture_output=True, text=True, cwd=REPO,
                         timeout=120,
                         check=False)
    assert res.returncode == EXIT_USAGE and "required" in res.stderr


def test_adapt_bn_init_target_saves_the_folders_statistics(data, tmp_path):
    import torch

    from lib.common.backbones import load_backbone

    target = data["category"] / "test"
    states = {}
    for init in ("source", "target", "matched"):
        states[init] = tmp_path / f"{init}.pt"
        assert main(["adapt", str(data["bank"]), str(target), "-o", str(states[init]), "--epochs", "0",
                     "--bn-init", init, "--batch-size", "8", "--device", "cpu", "-q"]) == EXIT_OK
    source = load_backbone("mobilenet_v2").bn_modules()[0].running_mean
    saved = {k: torch.load(v, weights_only=False)["bn"]["0.running_mean"] for k, v in states.items()}
    assert torch.equal(saved["source"], source)  # no alignment step from the source statistics: nothing moved
    assert not torch.allclose(saved["target"], source)  # AdaBN: the folder's own statistics
    assert not torch.allclose(saved["matched"], saved["target"])  # referenced to the training images instead
    stats_only = tmp_path / "stats.pt"
    assert main(["adapt", str(data["bank"]), str(target), "-o", str(stats_only), "--epochs", "0", "--bn-init",
                 "matched", "--batch-size", "8", "--device", "cpu", "-q"]) == EXIT_OK
    blob = torch.load(stats_only, weights_only=False)
    assert blob["info"]["steps"] == 0 and not torch.allclose(blob["bn"]["0.running_mean"], source)
    assert torch.equal(blob["bn"]["0.weight"], load_backbone("mobilenet_v2").bn_modules()[0].weight)


def test_printouts_name_how_the_state_was_made(data, tmp_path, capsys):
    """A statistics-only state is not reported as an alignment method's result, and vice versa."""
    target = data["category"] / "test"
    stats, aligned = tmp_path / "stats.pt", tmp_path / "aligned.pt"
    for out, extra in ((stats, ["--epochs", "0"]), (aligned, ["--steps", "1"])):
        assert main(["adapt", str(data["bank"]), str(target), "-o", str(out), "--bn-init", "matched",
                     "--batch-size", "8", "--device", "cpu", "-q", *extra]) == EXIT_OK
    capsys.readouterr()
    for state, label in ((stats, "adapted: BatchNorm statistics (matched), no alignment"),
                         (aligned, "adapted: roda after matched statistics")):
        assert main(["evaluate", str(data["bank"]), str(data["category"]), "--state", str(state), "--device", "cpu",
                     "-q"]) == EXIT_OK
        assert label in capsys.readouterr().out


def test_adapt_bn_init_gated_saves_what_its_gate_chose(data, tmp_path, capsys):
    """--bn-init gated: the state file records the statistics the gate kept and the two distances it compared,
    its running statistics are those statistics, and the printout says which."""
    import torch

    target = data["category"] / "test"
    out = {}
    for init in ("gated", "matched"):
        out[init] = tmp_path / f"{init}.pt"
        assert main(["adapt", str(data["bank"]), str(target), "-o", str(out[init]), "--epochs", "0", "--bn-init", init,
                     "--batch-size", "8", "--device", "cpu"]) == EXIT_OK
    printed = capsys.readouterr().out
    gated, matched = (torch.load(out[k], weights_only=False) for k in ("gated", "matched"))
    info = gated["info"]
    assert info["bn_init"] == "gated" and info["bn_start"] in ("matched", "source")
    assert (info["bn_start"] == "matched") == (info["nn_matched"] < info["nn_source"])
    assert f"--bn-init gated kept the {info['bn_start']} statistics" in printed
    from lib.common.backbones import load_backbone

    kept = matched["bn"] if info["bn_start"] == "matched" else {
        "0.running_mean": load_backbone("mobilenet_v2").bn_modules()[0].running_mean}
    assert torch.equal(gated["bn"]["0.running_mean"], kept["0.running_mean"])


def test_adapt_bn_init_matched_needs_the_reference_that_fit_writes(data, tmp_path, capsys):
    import shutil

    bank = tmp_path / "copy.pt"
    shutil.copy(data["bank"], bank)  # the bank without its .bnref.pt
    assert main(["adapt", str(bank), str(data["category"] / "test"), "-o", str(tmp_path / "s.pt"), "--steps", "1",
                 "--bn-init", "matched", "--device", "cpu", "-q"]) == EXIT_USAGE
    assert "roda fit" in capsys.readouterr().err
    assert not (tmp_path / "s.pt").exists()


def test_adapt_runs_a_named_variant_and_flags_override_it(data, tmp_path, capsys):
    """--variant roda_robust_matched_slow (the README's recommendation): coverage weights and matched statistics
    from what `fit` kept beside the bank, the variant's lr; an explicit --lr wins; without the side file the
    error names the fix."""
    import torch

    from lib.experiments.profiles import SLOW_LR

    target = data["category"] / "test"
    state = tmp_path / "v.pt"
    assert main(["adapt", str(data["bank"]), str(target), "-o", str(state), "--variant", "roda_robust_matched_slow",
                 "--epochs", "1", "--batch-size", "4", "--device", "cpu", "-q"]) == EXIT_OK
    info = torch.load(state, weights_only=False)["info"]
    assert info["variant"] == "roda_robust_matched_slow" and info["bn_init"] == "matched"
    assert info["lr"] == SLOW_LR and info["options"]["weights"] == "coverage" and info["steps"] == 2
    assert main(["adapt", str(data["bank"]), str(target), "-o", str(state), "--variant", "roda_robust_matched_slow",
                 "--epochs", "1", "--batch-size", "4", "--lr", "0.01", "--device", "cpu", "-q"]) == EXIT_OK
    assert torch.load(state, weights_only=False)["info"]["lr"] == 0.01
    lonely = tmp_path / "lonely.pt"
    shutil.copy(data["bank"], lonely)  # a bank without the record `fit` writes beside it
    assert main(["adapt", str(lonely), str(target), "-o", str(state), "--variant", "roda_robust_matched_slow",
                 "-q"]) == EXIT_USAGE
    assert "rebuild the bank with `roda fit`" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["adapt", str(data["bank"]), str(target), "-o", str(state), "--variant", "nope"])
    assert exc.value.code == EXIT_USAGE


# ------------------------------------------------------------------- every bad input stops before the compute


def _nothing_heavy(monkeypatch):
    """Fail the test if a backbone is loaded (every command loads one before its compute)."""
    from lib.common import backbones

    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: pytest.fail("a backbone was loaded"))


@pytest.mark.parametrize(("argv", "shown"), [
    (["fit", "--coreset-ratio", "-0.5"], "argument --coreset-ratio: must be a number in (0, 1], got -0.5"),
    (["fit", "--coreset-ratio", "5"], "argument --coreset-ratio: must be a number in (0, 1], got 5"),
    (["fit", "--max-bank", "-3"], "argument --max-bank: must be none or an integer >= 1, got -3"),
    (["fit", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["fit", "--crop", "8"], "must be an integer >= 32, got 8"),
    (["adapt", "--epochs", "-1"], "argument --epochs: must be an integer >= 0, got -1"),
    (["adapt", "--lr", "abc"], "argument --lr: must be a number > 0, got abc"),
    (["adapt", "--momentum", "1"], "argument --momentum: must be a number in [0, 1), got 1"),
])
def test_options_follow_the_profiles_rules_and_show_what_was_typed(data, tmp_path, capsys, argv, shown):
    """--coreset-ratio -0.5 built a 1-entry bank with exit code 0: the options go through the profiles' rules."""
    command, *flags = argv
    head = [command, str(data["category"] / "train" / "good")] if command == "fit" else \
        [command, str(data["bank"]), str(data["category"] / "test")]
    with pytest.raises(SystemExit) as exc:
        main([*head, "-o", str(tmp_path / "out.pt"), *flags])
    assert exc.value.code == EXIT_USAGE and shown in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_interrupted_score_leaves_nothing_and_keeps_the_last_complete_output(data, tmp_path, monkeypatch, capsys):
    from lib.common import folders

    target, out = data["category"] / "test", tmp_path / "scores"
    assert main(["score", str(data["bank"]), str(target), "-o", str(out), "-q"]) == EXIT_OK
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(before) == 10  # scores.csv, run.json, 8 maps
    calls, real = [], folders.overlay

    def interrupted(*args, **kwargs):  # Ctrl-C while the third map is being drawn
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(folders, "overlay", interrupted)
    fresh = tmp_path / "fresh"
    assert main(["score", str(data["bank"]), str(target), "-o", str(fresh), "-q"]) == EXIT_INTERRUPTED
    assert "no partial output was written" in capsys.readouterr().err
    assert not fresh.exists()
    calls.clear()
    assert main(["score", str(data["bank"]), str(target), "-o", str(out), "-q"]) == EXIT_INTERRUPTED
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the previous complete output, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]  # no temporary folder left beside it


def test_an_unwritable_output_fails_before_any_compute_naming_the_option(data, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    _nothing_heavy(monkeypatch)
    good, test = str(data["category"] / "train" / "good"), str(data["category"] / "test")
    bank = str(data["bank"])
    for argv, flag in ((["fit", good, "-o", str(blocker / "bank.pt")], "-o/--output"),
                       (["adapt", bank, test, "-o", str(blocker / "state.pt")], "-o/--output"),
                       (["score", bank, test, "-o", str(blocker / "out")], "-o/--output"),
                       (["score", bank, test, "-o", str(blocker)], "-o/--output"),
                       (["evaluate", bank, str(data["category"]), "--json", str(blocker / "s.json")], "--json"),
                       (["evaluate", bank, str(data["category"]), "-o", str(tmp_path)], "-o/--output")):
        assert main([*argv, "-q"]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert f"{flag} " in err and "out_dir" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_loss_options_are_checked_by_name_and_type_and_a_degenerate_eps_before_sinkhorn(data, tmp_path, monkeypatch,
                                                                                         capsys):
    from lib.roda import alignment

    base = ["adapt", str(data["bank"]), str(data["category"] / "test"), "-o", str(tmp_path / "s.pt"), "-q",
            "--steps", "1", "--batch-size", "8"]
    for option, shown in (("eps=abc", "--option eps=abc: eps must be a number > 0 or 'auto', got abc"),
                          ("eps=-1", "--option eps=-1: eps must be a number > 0 or 'auto', got -1"),
                          ("rule=orr", "did you mean: 'orr' -> 'or'")):
        assert main([*base, "--option", option]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert shown in err and "-10." not in err
    monkeypatch.setattr(alignment, "sinkhorn", lambda *a, **k: pytest.fail("Sinkhorn ran on a degenerate eps"))
    assert main([*base, "--option", "eps=1e-9"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--option eps=1e-9 is degenerate" in err and "use eps >=" in err
    assert not list(tmp_path.iterdir())


def test_fit_on_a_category_reads_train_good_only(data, tmp_path, capsys):
    import torch

    bank = tmp_path / "cat.pt"
    assert main(["fit", str(data["category"]), "-o", str(bank), "--resize", "64", "--crop", "none",
                 "--coreset-ratio", "0.2", "--device", "cpu", "-q"]) == EXIT_OK
    assert f"from 8 images in {data['category'] / 'train' / 'good'}" in capsys.readouterr().out
    ours, reference = (torch.load(p, weights_only=False)["bank"] for p in (bank, data["bank"]))
    assert torch.equal(ours, reference)  # the same bank as from train/good itself: no test image went in
    partial = tmp_path / "partial"
    shutil.copytree(data["category"] / "test", partial / "test")
    shutil.copytree(data["category"] / "ground_truth", partial / "ground_truth")
    assert main(["fit", str(partial), "-o", str(tmp_path / "p.pt"), "-q"]) == EXIT_FAILURE
    assert "no train/good: pass the folder of normal training images" in capsys.readouterr().err
    assert not (tmp_path / "p.pt").exists()


def test_a_state_adapted_against_another_bank_is_refused_unless_forced(data, tmp_path, capsys):
    other = tmp_path / "other.pt"
    assert main(["fit", str(data["category"] / "train" / "good"), "-o", str(other), "--resize", "64", "--crop",
                 "none", "--coreset-ratio", "0.1", "-q"]) == EXIT_OK
    state = tmp_path / "state.pt"
    assert main(["adapt", str(data["bank"]), str(data["category"] / "test"), "-o", str(state), "--epochs", "0",
                 "--bn-init", "target", "-q"]) == EXIT_OK
    out = tmp_path / "scores"
    assert main(["score", str(other), str(data["category"] / "test"), "--state", str(state), "-o", str(out),
                 "--no-maps", "-q"]) == EXIT_FAILURE
    assert "adapted against another bank" in capsys.readouterr().err and not out.exists()
    assert main(["evaluate", str(other), str(data["category"]), "--state", str(state), "-q"]) == EXIT_FAILURE
    assert "--force" in capsys.readouterr().err
    assert main(["score", str(other), str(data["category"] / "test"), "--state", str(state), "-o", str(out),
                 "--no-maps", "--force", "-q"]) == EXIT_OK
    assert "(--force)" in capsys.readouterr().err


def test_help_shows_each_default_once(capsys):
    for command in ("fit", "adapt", "score", "evaluate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert "(default: None)" not in text
        assert not re.search(r"\(default:? [^)]*\)\s*\(default", text), text
        assert "images per batch (default: " in text and "augmentation (default: 0)" in text


def test_evaluate_writes_paths_relative_to_the_folder_as_score_does(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a working directory unrelated to the data
    assert main(["evaluate", str(data["bank"]), str(data["category"]), "-o", "e.csv", "-q"]) == EXIT_OK
    assert main(["score", str(data["bank"]), str(data["category"]), "-o", "s", "--no-maps", "-q"]) == EXIT_OK
    evaluated = pd.read_csv(tmp_path / "e.csv")["path"]
    assert sorted(evaluated) == sorted(p for p in pd.read_csv(tmp_path / "s" / "scores.csv")["path"]
                                       if p.startswith("test/"))
    assert "test/good/000.png" in set(evaluated)


def test_adapt_defaults_to_the_recommended_variant():
    """`roda adapt` without --variant runs the configuration docs/recommendation.md chose; `none` is the paper's."""
    from lib.experiments.cli import build_parser
    from lib.experiments.profiles import _BASE, RECOMMENDED

    parse = build_parser().parse_args
    assert RECOMMENDED in _BASE["roda"]["variants"]
    assert parse(["adapt", "bank.pt", "folder", "-o", "s.pt"]).variant == RECOMMENDED
    assert parse(["adapt", "bank.pt", "folder", "-o", "s.pt", "--variant", "none"]).variant == "none"
