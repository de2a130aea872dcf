"""RoDA on an anomalib PatchCore, on real MVTec data under a shift (docs/anomalib.md, the real-data example).

    PYTHONPATH=. python scripts/anomalib_example.py --tasks mvtec/bottle --seeds 0 \
        --out results/real_full/anomalib_example.csv      # needs the anomalib extra and ../shared/data

For each category: an anomalib ``Patchcore`` on timm's ``mobilenetv2_100`` with the bundled ImageNet weights
(:func:`lib.roda.anomalib_model.load_bundled_mobilenet_v2`; built offline with ``pre_trained=False``) is fitted
by anomalib's own ``Engine`` on the clean training images (anomalib's ``MVTecAD`` datamodule). Then, per
corruption and seed, the profile's shift (its corruption stage and severity) is written to disk as a user would
meet it: the adaptation split (unlabeled, the profile's ``adapt_fraction`` of the test set, as in the RoDA grid)
in ``target/``, the rest as an MVTec category with its masks. Each method adapts a fresh copy of the checkpoint
with :func:`lib.roda.anomalib_model.adapt_patchcore` (``patchcore``: none) and anomalib's model scores the
evaluation images (raw scores and anomaly maps, before anomalib's post-processor): image and pixel AUROC, one row
per (task, corruption, seed, method), written atomically. Resumable: rows already in ``--out`` are skipped.
Materialised images go under ``--work`` (default ``runs/anomalib_example``, git-ignored).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib.common.data import AnomalyDataset  # noqa: E402
from lib.common.folders import labelled_items  # noqa: E402
from lib.common.utils import read_csv, seed_everything, write_csv  # noqa: E402
from lib.experiments import profiles  # noqa: E402
from lib.experiments.anomalib_cli import aurocs  # noqa: E402
from lib.experiments.roda_grid import config_for, method_specs  # noqa: E402
from lib.experiments.roda_steps import resolve_task, target_split  # noqa: E402
from lib.roda.anomalib_model import (  # noqa: E402
    BUNDLED_TIMM_BACKBONE,
    adapt_patchcore,
    load_bundled_mobilenet_v2,
    load_patchcore,
)

KEY = ["task", "corruption", "severity", "stage", "seed", "method"]
#: the taps of the project's MobileNetV2 (features[:7], features[:14]) under timm's names
LAYERS = ("blocks.2", "blocks.4")


def _key(row: dict) -> tuple:
    """A row's identity for resuming: its :data:`KEY` values as text (a CSV read back holds them as numbers)."""
    return tuple(str(row[k]) for k in KEY)


def fit(task, data_root: Path, work: Path, coreset_ratio: float) -> Path:
    """An anomalib PatchCore fitted by anomalib's Engine on the clean training images; its checkpoint path."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Patchcore

    category = task.name.split("/", 1)[1]
    ckpt = work / "model.ckpt"
    if ckpt.is_file():
        return ckpt
    seed_everything(0)
    model = Patchcore(backbone=BUNDLED_TIMM_BACKBONE, layers=LAYERS, pre_trained=False,
                      coreset_sampling_ratio=coreset_ratio, visualizer=False)
    load_bundled_mobilenet_v2(model)
    data = MVTecAD(root=data_root, category=category, train_batch_size=16, eval_batch_size=16, num_workers=0)
    engine = Engine(default_root_dir=work / "anomalib", accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False, enable_model_summary=False)
    engine.fit(model=model, datamodule=data)
    shutil.copyfile(engine.best_model_path, ckpt)
    return ckpt


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def materialise(task, samples, corruption: str, severity: int, seed: int, folder: Path, labelled: bool) -> Path:
    """``samples`` under the shift as 8-bit PNGs at the task's resize (no crop: anomalib resizes the whole image):
    flat in ``folder`` (unlabeled), or as an MVTec category ``folder/test/<defect>`` with ``ground_truth`` masks."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    data = AnomalyDataset(samples, resize=task.resize, crop=None, corruption=corruption, severity=severity,
                          seed=seed, stage=task.stage, native=task.native)
    for i in range(len(data)):
        item = data[i]
        image = item["image"].mul(255).round().byte().permute(1, 2, 0).numpy()
        name = f"{i:03d}_{Path(item['path']).stem}.png"
        if not labelled:
            _save(image, folder / name)
            continue
        _save(image, folder / "test" / item["defect"] / name)
        if item["label"]:
            mask = (item["mask"][0].numpy() > 0.5).astype(np.uint8) * 255
            _save(mask, folder / "ground_truth" / item["defect"] / f"{Path(name).stem}_mask.png")
    done.touch()
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="real_full")
    ap.add_argument("--tasks", default="mvtec/bottle", help="comma-separated MVTec categories")
    ap.add_argument("--corruptions", default=None, help="default: the profile's")
    ap.add_argument("--methods", default="patchcore,adabn_matched,roda,recommended")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=str(REPO / "runs" / "anomalib_example"))
    args = ap.parse_args(argv)

    cfg = profiles.get_profile(args.profile, data_root=args.data_root)
    shift = cfg["corruption"]
    corruptions = args.corruptions.split(",") if args.corruptions else list(shift["names"])
    specs = method_specs(cfg)
    methods = [profiles.RECOMMENDED if m == "recommended" else m for m in args.methods.split(",")]
    unknown = [m for m in methods if m != "patchcore" and m not in specs]
    if unknown:
        ap.error(f"unknown methods {unknown}: choose from patchcore, recommended, {', '.join(sorted(specs))}")
    out = Path(args.out)
    rows = read_csv(out).to_dict("records") if out.is_file() else []
    done = {_key(r) for r in rows}
    batch = cfg["patchcore"]["batch_size"]
    for name in args.tasks.split(","):
        task = resolve_task(cfg, name)
        data_root = Path(profiles.data_root_for(cfg, name))
        work = Path(args.work) / name.replace("/", "-")
        work.mkdir(parents=True, exist_ok=True)
        ckpt = fit(task, data_root, work, cfg["patchcore"]["coreset_ratio"])
        train = [s.path for s in task.train]
        for seed in [int(s) for s in args.seeds.split(",")]:
            adapt_split, eval_split = target_split(task, shift["adapt_fraction"], seed)
            for corruption in corruptions:
                key = dict(task=name, corruption=corruption, severity=shift["severity"], stage=task.stage, seed=seed)
                todo = [m for m in methods if _key(dict(key, method=m)) not in done]
                if not todo:
                    continue
                cell = work / f"{corruption}_sev{shift['severity']}_{task.stage}_s{seed}"
                target = materialise(task, adapt_split, corruption, shift["severity"], seed, cell / "target", False)
                test, _ = labelled_items(
                    materialise(task, eval_split, corruption, shift["severity"], seed, cell / "eval", True))
                for method in todo:
                    module = load_patchcore(ckpt)
                    t0 = time.perf_counter()
                    steps = 0
                    if method != "patchcore":
                        seed_everything(seed)
                        module, history = adapt_patchcore(module, target, config_for(cfg, specs[method], seed),
                                                          train_images=train, show_progress=False)
                        steps = len(history)
                    took = time.perf_counter() - t0
                    _, scores = aurocs(module, test, batch, quiet=True)  # (predict runs under no_grad)
                    rows.append(dict(key, method=method, backbone=f"anomalib {BUNDLED_TIMM_BACKBONE} (bundled)",
                                     **scores, n_eval=len(test), n_adapt=len(adapt_split), steps=steps,
                                     adapt_seconds=round(took, 1)))
                    write_csv(pd.DataFrame(rows), out)
                    print(f"{name} {corruption} s{seed} {method}: image {100 * scores['image_auroc']:.1f} "
                          f"pixel {100 * scores['pixel_auroc']:.1f} ({took:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
