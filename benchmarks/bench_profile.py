#!/usr/bin/env python
"""Where the time of a PatchCore run goes, stage by stage, at the ``default`` profile's sizes.

    PYTHONPATH=$PWD python benchmarks/bench_profile.py                  # ELPV, MobileNetV2, 1 thread
    PYTHONPATH=$PWD python benchmarks/bench_profile.py --threads 2 --n-train 60 --n-test 60

Stages (each timed on its own, in this order, in one process):

* ``decode``      image file -> resized, centre-cropped uint8 array (PIL), train and test images;
* ``corrupt``     one corruption per row (severity 5) on the resized test images, as ``AnomalyDataset`` does;
* ``to_tensor``   uint8 HWC -> float CHW in [0, 1], batched (the collate of the loader);
* ``backbone``    the frozen extractor's forward to its last tap (train and test batches);
* ``aggregate``   3x3 neighbourhoods, interpolation, the two adaptive average pools
  (:func:`lib.roda.patchcore.aggregate`);
* ``coreset``     approximate greedy coreset of the training patches (``coreset_ratio``, capped at ``max_bank``);
* ``knn``         every test patch's nearest bank entry (:func:`lib.roda.patchcore.nearest_distances`);
* ``maps``        bilinear upsampling and Gaussian blur of the patch scores (:meth:`PatchCore.anomaly_maps`).

Prints a markdown table (seconds, share of the total, milliseconds per item) and optionally writes it as JSON.
It times the library's default code paths, so running it before and after a change shows what the change bought.
The RoDA adaptation step is profiled by the RoDA benchmarks (``bench_sinkhorn.py`` and the adaptation code).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from lib.common.backbones import load_backbone
from lib.common.corruptions import corrupt, image_seed
from lib.common.data import GEOMETRY, _center_crop, _resize_size, load_image, load_task, subsample
from lib.roda.patchcore import SMALL_BACKBONE_DIMS, PatchCore, aggregate, greedy_coreset, nearest_distances


class Timer:
    def __init__(self):
        self.rows = []

    def add(self, stage, seconds, items, unit, note=""):
        self.rows.append(dict(stage=stage, seconds=seconds, items=items, unit=unit, note=note,
                              ms_per_item=1000.0 * seconds / max(items, 1)))

    def table(self) -> str:
        total = sum(r["seconds"] for r in self.rows)
        lines = ["| stage | items | seconds | share | ms / item | note |", "|---|---:|---:|---:|---:|---|"]
        for r in self.rows:
            lines.append(f"| {r['stage']} | {r['items']:,} {r['unit']} | {r['seconds']:.2f} | "
                         f"{100 * r['seconds'] / total:.1f}% | {r['ms_per_item']:.2f} | {r['note']} |")
        lines.append(f"| **total** | | **{total:.2f}** | 100% | | |")
        return "\n".join(lines)


def _resized(sample, resize):
    image = load_image(sample.path, sample.box)
    size = _resize_size(image.size, resize)
    return np.asarray(image.resize(size, resample=2), dtype=np.uint8)  # 2 = PIL bilinear, as lib.common.data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="elpv")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--n-train", type=int, default=120, help="default profile: max_train=120")
    ap.add_argument("--n-test", type=int, default=150, help="default profile: max_test=150")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--coreset-ratio", type=float, default=0.01)
    ap.add_argument("--max-bank", type=int, default=2000)
    ap.add_argument("--corruptions", default="gaussian_noise,defocus_blur,brightness,contrast")
    ap.add_argument("--n-corrupt", type=int, default=30, help="test images per corruption")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    timer = Timer()

    task = load_task(args.task)
    train = subsample(task.train, args.n_train, seed=0)
    test = subsample(task.test, args.n_test, seed=0)
    geom = GEOMETRY.get(args.task, GEOMETRY["mvtec"])

    # decoding
    t0 = time.perf_counter()
    resized = [_resized(s, geom["resize"]) for s in train + test]
    cropped = [_center_crop(a, geom["crop"]) for a in resized]
    timer.add("decode", time.perf_counter() - t0, len(resized), "images", "PIL open + resize + crop")

    # corruption
    for name in [c for c in args.corruptions.split(",") if c]:
        arrays = resized[len(train):][: args.n_corrupt]
        t0 = time.perf_counter()
        for s, a in zip(test, arrays):
            corrupt(a, name, 5, image_seed(f"{s.path}|{name}|5", 0))
        timer.add(f"corrupt {name}@5", time.perf_counter() - t0, len(arrays), "images")

    # to tensor
    t0 = time.perf_counter()
    batches = []
    for i in range(0, len(cropped), args.batch_size):
        chunk = np.stack(cropped[i : i + args.batch_size])
        batches.append(torch.from_numpy(chunk).permute(0, 3, 1, 2).float().div_(255.0))
    timer.add("to_tensor", time.perf_counter() - t0, len(cropped), "images")
    images = torch.cat(batches)
    train_x, test_x = images[: len(train)], images[len(train):]

    extractor = load_backbone(args.backbone, device="cpu")
    model = PatchCore(extractor, coreset_ratio=args.coreset_ratio, max_bank=args.max_bank, device="cpu")
    pretrain_dim, target_dim = model.pretrain_dim, model.target_dim
    assert (pretrain_dim, target_dim) == SMALL_BACKBONE_DIMS or args.backbone in ("wide_resnet50_2", "resnet18")

    def run(x):
        maps_all, t_bb = [], 0.0
        for i in range(0, len(x), args.batch_size):
            t0 = time.perf_counter()
            maps_all.append([m.clone() for m in extractor(x[i : i + args.batch_size])])
            t_bb += time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = [aggregate(maps, pretrain_dim, target_dim)[0] for maps in maps_all]
        t_ag = time.perf_counter() - t0
        return torch.cat(feats), t_bb, t_ag

    extractor(train_x[:2])  # warm-up (allocator, lazy init)
    f_train, bb1, ag1 = run(train_x)
    f_test, bb2, ag2 = run(test_x)
    n_img = len(train_x) + len(test_x)
    timer.add("backbone", bb1 + bb2, n_img, "images",
              f"{args.backbone} to {extractor.layers[-1]}, batch {args.batch_size}")
    timer.add("aggregate", ag1 + ag2, n_img, "images", f"3x3 + pools to {target_dim}")

    flat = f_train.reshape(-1, f_train.shape[-1]).contiguous()
    n_core = max(1, int(round(args.coreset_ratio * flat.shape[0])))
    n_core = min(n_core, args.max_bank) if args.max_bank else n_core
    t0 = time.perf_counter()
    idx = greedy_coreset(flat, n_core, proj_dim=128, seed=0)
    t_core = time.perf_counter() - t0
    timer.add("coreset", t_core, n_core, "centres", f"from {flat.shape[0]:,} x {flat.shape[1]} patches")
    bank = flat[idx].contiguous()

    q = f_test.reshape(-1, f_test.shape[-1]).contiguous()
    t0 = time.perf_counter()
    d, _ = nearest_distances(q, bank)
    timer.add("knn", time.perf_counter() - t0, len(test_x), "images", f"{q.shape[0]:,} patches vs {bank.shape[0]:,}")

    grid = int(round(q.shape[0] / len(test_x)) ** 0.5)
    ps = d.reshape(len(test_x), grid, grid)
    t0 = time.perf_counter()
    model.anomaly_maps(ps, test_x.shape[-2:])
    timer.add("maps", time.perf_counter() - t0, len(test_x), "images", "upsample + blur sigma 4")

    cpu = platform.processor() or platform.machine()
    header = (f"torch {torch.__version__}, threads {torch.get_num_threads()}, {cpu}, "
              f"{os.cpu_count()} CPUs; task {args.task}: {len(train)} train / {len(test)} test images; "
              f"score checksum {float(d.double().sum()):.6f}, coreset first ids {idx[:5].tolist()}")
    print(header)
    print(timer.table())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(header=header, rows=timer.rows), fh, indent=2)
    return timer


if __name__ == "__main__":
    main()
