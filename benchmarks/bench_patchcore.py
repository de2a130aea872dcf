#!/usr/bin/env python
"""Coreset selection and kNN scoring: time, coverage radius and peak memory, ours next to anomalib's.

    PYTHONPATH=$PWD python benchmarks/bench_patchcore.py                       # 100k x 256, 1% coreset
    PYTHONPATH=$PWD python benchmarks/bench_patchcore.py --n 50000 100000      # memory grows linearly in N
    PYTHONPATH=$PWD:/path/to/anomalib/site python benchmarks/bench_patchcore.py --anomalib

``--anomalib`` runs anomalib's ``KCenterGreedy`` (2.7.0) on the same features in the same process, right
after ours, so the ratio holds on a busy machine. anomalib is an optional benchmark dependency, never a
project requirement; where its package ``__init__`` cannot import (it pulls in lightning, jsonargparse, ...),
the two files ``KCenterGreedy`` consists of (``sampling/k_center_greedy.py`` and
``dimensionality_reduction/random_projection.py``) are loaded from the installed anomalib unchanged.
Install it apart from the project's environment, e.g. ``pip install --target /some/dir --no-deps anomalib==2.7.0``
and put that directory on ``PYTHONPATH``.

The coverage radius ``max_z min_m ||z - m||`` (RoDA Eq. 1) is measured in the original feature space for
both. Peak memory is the largest resident-set growth seen (sampled every 2 ms) while a method runs; an
N x N float32 matrix is printed for scale. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading
import time
import types

os.environ.setdefault("TQDM_DISABLE", "1")  # read at tqdm's import: no progress-bar cost in anomalib's loop either
import torch  # noqa: E402

from lib.roda.patchcore import coverage_radius, faiss_available, greedy_coreset, nearest_distances  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measured(fn, *args, **kwargs):
    """(result, seconds, peak RSS growth in MB) of ``fn(*args, **kwargs)``."""
    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb() - base)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        thread.join()
    return out, seconds, max(peak[0], rss_mb() - base)


def load_kcenter_greedy():
    """anomalib's ``KCenterGreedy`` class, or None (with the reason printed) when anomalib is absent."""
    try:
        from anomalib.models.components.sampling import KCenterGreedy

        return KCenterGreedy
    except ImportError as exc:
        reason = exc
    spec = importlib.util.find_spec("anomalib")
    if spec is None or not spec.submodule_search_locations:
        print(f"anomalib not installed ({reason}): pip install --target DIR --no-deps anomalib==2.7.0")
        return None
    root = os.path.join(list(spec.submodule_search_locations)[0], "models", "components")
    files = {"anomalib.models.components.dimensionality_reduction":
             os.path.join(root, "dimensionality_reduction", "random_projection.py"),
             "anomalib.models.components.sampling.k_center_greedy":
             os.path.join(root, "sampling", "k_center_greedy.py")}
    for pkg in ("anomalib", "anomalib.models", "anomalib.models.components"):
        sys.modules.setdefault(pkg, types.ModuleType(pkg))
    for name, path in files.items():
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    print(f"anomalib package import failed ({reason}); loaded KCenterGreedy from {files[name]}")
    return sys.modules["anomalib.models.components.sampling.k_center_greedy"].KCenterGreedy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100_000], help="patches in the training set")
    ap.add_argument("--dim", type=int, default=256, help="patch feature dimension")
    ap.add_argument("--ratio", type=float, default=0.01, help="coreset ratio")
    ap.add_argument("--proj-dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=7840, help="test patches to score (10 images x 784)")
    ap.add_argument("--anomalib", action="store_true", help="also run anomalib's KCenterGreedy")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kcg = load_kcenter_greedy() if args.anomalib else None
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {dev}")
    for n in args.n:
        g = torch.Generator().manual_seed(0)
        feats = torch.randn(n, args.dim, generator=g).to(dev)
        n_core = max(1, int(args.ratio * n))
        print(f"\n{n:,} x {args.dim} features ({feats.numel() * 4 / 2**20:,.0f} MB), {n_core:,} centres; "
              f"an N x N float32 matrix would need {n * n * 4 / 2**30:,.1f} GB")
        idx, t_ours, mem_ours = measured(greedy_coreset, feats, n_core, proj_dim=args.proj_dim, seed=0)
        r_ours = coverage_radius(feats, feats[idx])
        print(f"  ours     coreset: {t_ours:7.2f} s ({1000 * t_ours / n_core:6.2f} ms/step), radius {r_ours:.3f}, "
              f"peak +{mem_ours:,.0f} MB  (projection {args.proj_dim})")
        if kcg is not None:
            torch.manual_seed(0)
            sampler = kcg(embedding=feats, sampling_ratio=args.ratio)
            a_idx, t_a, mem_a = measured(sampler.select_coreset_idxs)
            r_a = coverage_radius(feats, feats[torch.as_tensor(a_idx)])
            print(f"  anomalib coreset: {t_a:7.2f} s ({1000 * t_a / n_core:6.2f} ms/step), radius {r_a:.3f}, "
                  f"peak +{mem_a:,.0f} MB  (projection {sampler.features.shape[1]})")
            print(f"  speed-up {t_a / t_ours:.1f}x at radius ratio ours/anomalib {r_ours / r_a:.3f}")
        bank = feats[idx].contiguous()
        queries = torch.randn(args.queries, args.dim, generator=g).to(dev)
        (d, _), t_knn, _ = measured(nearest_distances, queries, bank)
        line = f"  kNN torch: {args.queries:,} queries vs {n_core:,} in {t_knn:.3f} s"
        if faiss_available():
            (d_f, _), t_f, _ = measured(nearest_distances, queries, bank, backend="faiss")
            line += f"; faiss {t_f:.3f} s (max |d_torch - d_faiss| {float((d - d_f).abs().max()):.1e})"
        print(line)


if __name__ == "__main__":
    main()
