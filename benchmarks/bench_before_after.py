#!/usr/bin/env python
"""The PatchCore stages of an older commit next to this checkout's, interleaved in one process, on real features.

    PYTHONPATH=$PWD python benchmarks/bench_before_after.py                 # ref d6abb0c (before the speed work)
    PYTHONPATH=$PWD python benchmarks/bench_before_after.py --ref HEAD~3 --repeats 3

On a shared machine two separate runs see different loads, so ratios between them mean little. Here the
reference commit's ``lib`` is extracted with ``git archive`` into a temporary package ``reflib`` and each stage
runs old, new, old, new, ... (``--repeats`` times, the minimum kept) on the same inputs: ELPV images at the
default profile's sizes through MobileNetV2. Besides the times it checks that the outputs agree: the coreset
indices (identical), the aggregated features and the kNN scores (max absolute difference).
"""

from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from lib.common import backbones
from lib.common.data import GEOMETRY, AnomalyDataset, load_task, subsample
from lib.roda import patchcore

REPO = Path(__file__).resolve().parents[1]


def reference_lib(ref: str):
    """``lib`` as of ``ref``, importable as the package ``reflib``."""
    blob = subprocess.run(["git", "archive", ref, "lib"], cwd=REPO, check=True, capture_output=True).stdout
    root = Path(tempfile.mkdtemp(prefix="reflib-"))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(root, filter="data")
    (root / "lib").rename(root / "reflib")
    sys.path.insert(0, str(root))
    return importlib.import_module("reflib.patchcore"), importlib.import_module("reflib.backbones")


def best_of(repeats, fn):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="d6abb0c", help="the commit to compare with")
    ap.add_argument("--n-train", type=int, default=120)
    ap.add_argument("--n-test", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-bank", type=int, default=2000)
    ap.add_argument("--coreset-steps", type=int, default=300, help="greedy steps timed (the ratio per step holds)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    old_pc, old_bb = reference_lib(args.ref)

    task = load_task("elpv")
    samples = subsample(task.train, args.n_train, seed=0) + subsample(task.test, args.n_test, seed=0)
    ds = AnomalyDataset(samples, **GEOMETRY["elpv"])
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    batches = list(images.split(args.batch_size))

    rows = []

    def stage(name, old_fn, new_fn, compare):
        # interleave: old, new, old, new ... keep each one's best
        t_old, t_new, out_old, out_new = [], [], None, None
        for _ in range(args.repeats):
            t, out_old = best_of(1, old_fn)
            t_old.append(t)
            t, out_new = best_of(1, new_fn)
            t_new.append(t)
        rows.append((name, min(t_old), min(t_new), compare(out_old, out_new)))
        return out_old, out_new

    ex_old = old_bb.load_backbone("mobilenet_v2")
    ex_new = backbones.load_backbone("mobilenet_v2")
    maps_old, maps_new = stage(
        "backbone (NCHW -> channels-last)",
        lambda: [[m.clone() for m in ex_old(b)] for b in batches],
        lambda: [ex_new(b) for b in batches],
        lambda a, b: f"max |diff| {max(float((x - y).abs().max()) for p, q in zip(a, b) for x, y in zip(p, q)):.1e}")
    dims = (256, 256)
    f_old, f_new = stage(
        "aggregate",
        lambda: torch.cat([old_pc.aggregate(m, *dims)[0] for m in maps_old]),
        lambda: torch.cat([patchcore.aggregate(m, *dims)[0] for m in maps_old]),
        lambda a, b: f"max |diff| {float((a - b).abs().max()):.1e} (features up to {float(a.abs().max()):.1f})")
    step = [m[:20].detach().clone() for m in maps_old[0]]  # a RoDA step's 20 images (10 + 10 augmented views)
    if len(maps_old) > 1:
        step = [torch.cat([a, b])[:20].clone() for a, b in zip(maps_old[0], maps_old[1])]

    def fwd_bwd(module):
        def run():
            leaves = [m.clone().requires_grad_() for m in step]
            feats, _ = module.aggregate(leaves, *dims)
            (feats * feats).sum().backward()
            return [leaf.grad for leaf in leaves]
        return run

    stage("aggregate forward + backward (20 images)", fwd_bwd(old_pc), fwd_bwd(patchcore),
          lambda a, b: f"max |grad diff| {max(float((x - y).abs().max()) for x, y in zip(a, b)):.1e}")
    n_train_images = len(subsample(task.train, args.n_train, seed=0))
    train = f_new[:n_train_images].reshape(-1, dims[1]).contiguous()
    test = f_new[n_train_images:].reshape(-1, dims[1]).contiguous()
    steps = min(args.coreset_steps, args.max_bank)
    idx_old, idx_new = stage(
        f"coreset ({steps} steps of {train.shape[0]:,} x 128)",
        lambda: old_pc.greedy_coreset(train, steps, proj_dim=128, seed=0),
        lambda: patchcore.greedy_coreset(train, steps, proj_dim=128, seed=0),
        lambda a, b: "identical picks" if torch.equal(a, b) else f"{int((a != b).sum())} picks differ")
    n_bank = min(max(1, round(0.01 * train.shape[0])), args.max_bank)
    bank = train[patchcore.greedy_coreset(train, n_bank, proj_dim=128, seed=0)].contiguous()
    stage(
        f"kNN ({test.shape[0]:,} patches vs {bank.shape[0]:,})",
        lambda: old_pc.nearest_distances(test, bank),
        lambda: patchcore.nearest_distances(test, bank),
        lambda a, b: (f"max |diff| {float((a[0] - b[0]).abs().max()):.1e}, "
                      f"nearest index equal for {float((a[1] == b[1]).float().mean()):.4%}"))
    if patchcore.faiss_available():
        stage("kNN torch -> faiss", lambda: patchcore.nearest_distances(test, bank),
              lambda: patchcore.nearest_distances(test, bank, backend="faiss"),
              lambda a, b: f"max |diff| {float((a[0] - b[0]).abs().max()):.1e}")

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; reference {args.ref}; "
          f"ELPV {args.n_train} train / {args.n_test} test images; best of {args.repeats}, interleaved")
    print("| stage | before (s) | after (s) | speed-up | outputs |")
    print("|---|---:|---:|---:|---|")
    for name, a, b, note in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.1f}x | {note} |")
    main_rows = [r for r in rows if "backward" not in r[0] and "faiss" not in r[0]]
    total_old, total_new = sum(r[1] for r in main_rows), sum(r[2] for r in main_rows)
    print(f"| **backbone + aggregate + coreset + kNN** | **{total_old:.2f}** | **{total_new:.2f}** "
          f"| **{total_old / total_new:.1f}x** | |")


if __name__ == "__main__":
    main()
