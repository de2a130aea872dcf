#!/usr/bin/env python
"""Coreset selection and kNN scoring throughput, with peak memory, for a bank of N patches.

    python benchmarks/bench_patchcore.py                 # 100k patches x 256-d, 1% coreset
    python benchmarks/bench_patchcore.py --n 100000 --dim 1024 --ratio 0.01 --queries 7840

Prints figures; asserts nothing about time. The coreset never builds an N x N matrix: peak memory
grows linearly in N (compare --n 50000 with --n 100000).
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

import torch

from lib.patchcore import greedy_coreset, nearest_distances


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="patches in the training set")
    ap.add_argument("--dim", type=int, default=256, help="patch feature dimension")
    ap.add_argument("--ratio", type=float, default=0.01, help="coreset ratio")
    ap.add_argument("--proj-dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=7840, help="test patches to score (10 images x 784)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(args.n, args.dim, generator=g).to(dev)
    n_core = max(1, int(args.ratio * args.n))
    base = peak_rss_mb()

    tracemalloc.start()
    t0 = time.perf_counter()
    idx = greedy_coreset(feats, n_core, proj_dim=args.proj_dim, seed=0)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_core = time.perf_counter() - t0
    bank = feats[idx].contiguous()
    queries = torch.randn(args.queries, args.dim, generator=g).to(dev)
    t0 = time.perf_counter()
    d, _ = nearest_distances(queries, bank)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_knn = time.perf_counter() - t0
    tracemalloc.stop()
    nxn_gb = args.n * args.n * 4 / 1e9
    print(f"torch threads           : {torch.get_num_threads()}  device: {dev}")
    print(f"training patches        : {args.n:,} x {args.dim}  (features {feats.numel() * 4 / 1e6:.0f} MB)")
    print(f"coreset                 : {n_core:,} points ({args.ratio:.1%}) in {t_core:.2f} s "
          f"= {n_core / t_core:,.0f} selections/s, {args.n * n_core / t_core / 1e6:,.0f} M point-updates/s")
    print(f"kNN scoring             : {args.queries:,} queries vs {n_core:,} bank in {t_knn:.3f} s "
          f"= {args.queries / t_knn:,.0f} patches/s ({args.queries / 784 / t_knn:,.1f} images/s at 784 patches)")
    print(f"peak RSS                : {peak_rss_mb():,.0f} MB (before the run {base:,.0f} MB); "
          f"an N x N float32 matrix would need {nxn_gb:,.1f} GB")


if __name__ == "__main__":
    main()
