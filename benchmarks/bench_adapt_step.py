"""Time one RoDA adaptation step stage by stage (forward, cost, Sinkhorn, discretisation, backward, optimiser).

One step of :func:`lib.roda.adaptation.adapt` on a RoDA-sized problem: ``--images`` shifted images plus one
augmented view each (``10 + 10`` images -> 15,680 target patches with the bundled MobileNetV2 at 224 px)
against a ``--bank``-entry memory bank (2,500 by default). The bank is a random subset of clean patch features
of the same images' category (no coreset: the bank's contents barely change the timing). Each stage is timed
separately over ``--repeats`` steps (after one warm-up step) and printed as a table; ``--compare`` also times
the pre-#9 path (out-of-place cost with the autograd-safe square root, a normalised copy of the cost, a cold
Sinkhorn start), so the table shows before/after on the same machine state.

    OMP_NUM_THREADS=2 python benchmarks/bench_adapt_step.py                  # synthetic images (no data needed)
    python benchmarks/bench_adapt_step.py --data ../shared/data/mvtec --category screw --threads 2 --compare
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common import backbones
from lib.common.utils import all_finite, seed_everything
from lib.ot.transport import (
    _safe_sqrt,
    _sq_dist,
    cost_scale,
    discretize,
    normalize_cost,
    paired_cost,
    pairwise_cost,
    sinkhorn,
)
from lib.roda.adaptation import augment_batch
from lib.roda.alignment import roda_loss
from lib.roda.patchcore import PatchCore


def images_for(args):
    """``args.batches`` batches of ``args.images`` shifted test images (one tensor) and clean training images."""
    g = torch.Generator().manual_seed(0)
    n = args.images * args.batches
    if args.data is None:
        base = torch.rand(n, 3, 224, 224, generator=g)
        return base, torch.rand(4 * args.images, 3, 224, 224, generator=g)
    from lib.common import data
    from lib.experiments.roda_steps import dataset

    task = data.load_task(f"mvtec/{args.category}", args.data)
    test = dataset(task, data.subsample(task.test, n, 0), "gaussian_noise", 5, 0)
    train = dataset(task, data.subsample(task.train, 4 * args.images, 0))
    return (torch.stack([test[i]["image"] for i in range(len(test))]),
            torch.stack([train[i]["image"] for i in range(len(train))]))


def sync():
    """Wait for queued GPU work, so that a wall-clock interval covers it (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, times, key):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    times[key] = times.get(key, 0.0) + time.perf_counter() - t0
    return out


def step(model, bank, images, optimizer, times, eps, legacy: bool, state: dict):
    views = torch.cat([images, images.flip(-1)])
    ext = model.extractor
    with ext.differentiable_mode():
        feats = timed(lambda: model.embed(views), times, "forward")
    target = feats.reshape(-1, feats.shape[-1])
    with torch.no_grad():
        if legacy:  # the pre-#9 path: out-of-place cost with the autograd-safe sqrt, a normalised copy, cold start
            C = timed(lambda: _safe_sqrt(_sq_dist(target.detach(), bank)), times, "cost")
            Cn, _ = timed(lambda: normalize_cost(C, "mean"), times, "cost")
            del C
            log_plan, info = timed(lambda: sinkhorn(Cn, eps, tol=1e-6, return_log=True, warn=False), times,
                                   "sinkhorn")
            del Cn
        else:  # in-place cost, eps scaled instead of the cost, Sinkhorn in the cost's storage, warm start
            C = timed(lambda: pairwise_cost(target.detach(), bank, "l2"), times, "cost")
            s = timed(lambda: float(cost_scale(C, "mean")), times, "cost")
            kw = dict(return_log=True, warn=False, overwrite=True, **state.get("sinkhorn", {}))
            log_plan, info = timed(lambda: sinkhorn(C, eps * s, **kw), times, "sinkhorn")
            state["sinkhorn"] = dict(init=(None, info["g"]))
            del C
        pairs = timed(lambda: discretize(log_plan, "or"), times, "discretise")
    times["iters"] = times.get("iters", 0) + info["n_iter"]

    def backward():
        loss = paired_cost(target[pairs.rows], bank[pairs.cols], "l2").mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    timed(backward, times, "backward")
    timed(optimizer.step, times, "optimiser")


def library_step(model, bank, images, optimizer, generator, state: dict) -> int:
    """One step exactly as :func:`lib.roda.adaptation.adapt` runs it for ``method="roda"`` (augmented views,
    differentiable forward, the finiteness check, :func:`lib.roda.alignment.roda_loss` warm-started from the
    previous step's bank potentials, backward, SGD); returns the Sinkhorn iterations."""
    views, _ = augment_batch(images, torch.zeros(images.shape[0], 1, *images.shape[-2:]), "flip_rot90", generator)
    with model.extractor.differentiable_mode():
        feats = model.embed(views)
    target = feats.reshape(-1, feats.shape[-1])
    if not all_finite(target):
        raise RuntimeError("diverged")
    kw = {} if "g" not in state else dict(sinkhorn_kwargs=dict(init=(None, state["g"])))
    loss, info = roda_loss(target, bank, **kw)
    state["g"] = info["potentials"][1]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return info["sinkhorn_iters"]


def setup(args):
    """The network with trainable BatchNorm affine parameters, the target images, a random bank of clean patch
    features of the same category, and the SGD optimiser of the RoDA runs."""
    ext = backbones.load_backbone("mobilenet_v2", device=args.device)
    model = PatchCore(ext, device=args.device)
    images, train = (t.to(args.device) for t in images_for(args))
    with torch.no_grad():
        feats = model.embed(train).reshape(-1, model.target_dim)
    g = torch.Generator().manual_seed(1)
    bank = feats[torch.randperm(feats.shape[0], generator=g)[: args.bank]].contiguous()
    opt = torch.optim.SGD(ext.set_bn_affine_trainable(True), lr=0.003, momentum=0.9)
    return ext, model, images, bank, opt


def run_library(args):
    """Seconds per library step (``--repeats`` steps after one warm-up, seeded deterministic mode as in every
    run of the project) and the Sinkhorn iterations of each step."""
    seed_everything(0)
    ext, model, images, bank, opt = setup(args)
    generator = torch.Generator().manual_seed(0)
    state: dict = {}
    batches = images.split(args.images)  # the loop cycles through the target split's batches, as adapt does
    library_step(model, bank, batches[0], opt, generator, state)  # warm-up (cold Sinkhorn start)
    seconds, iters = [], []
    for k in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        iters.append(library_step(model, bank, batches[(k + 1) % len(batches)], opt, generator, state))
        sync()
        seconds.append(time.perf_counter() - t0)
    ext.set_bn_affine_trainable(False)
    return seconds, iters


def run(args, legacy: bool):
    torch.manual_seed(0)
    ext, model, images, bank, opt = setup(args)
    images = images[: args.images]
    state: dict = {}
    step(model, bank, images, opt, {}, args.eps, legacy, state)  # warm-up
    times: dict = {}
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        step(model, bank, images, opt, times, args.eps, legacy, state)
    total = (time.perf_counter() - t0) / args.repeats
    ext.set_bn_affine_trainable(False)
    out = {k: v / args.repeats for k, v in times.items()}
    out["total"] = total
    # the library loss as the adaptation loop calls it (one call, cold start), for reference
    with ext.differentiable_mode():
        target = model.embed(torch.cat([images, images.flip(-1)])).reshape(-1, model.target_dim)
    t0 = time.perf_counter()
    roda_loss(target.detach(), bank)
    out["roda_loss (cold, no grad)"] = time.perf_counter() - t0
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--bank", type=int, default=2500)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=3,
                   help="distinct target batches the library step cycles through (screw's 20%% split: 3 of 10)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=None, help="an MVTec root (default: random images)")
    p.add_argument("--category", default="screw")
    p.add_argument("--compare", action="store_true", help="also time the cold-start, tol 1e-6 settings")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when present)")
    args = p.parse_args(argv)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.set_num_threads(args.threads)
    seconds, iters = run_library(args)
    print(f"library step (lib.roda.adaptation.adapt's loop body: {args.images} images + {args.images} augmented views "
          f"vs {args.bank} bank entries, {args.device}, {args.threads} threads, deterministic mode, "
          "warm-started Sinkhorn):")
    print(f"  {statistics.mean(seconds):.3f} s per step (mean of {args.repeats}; median "
          f"{statistics.median(seconds):.3f}, min {min(seconds):.3f}, max {max(seconds):.3f}); "
          f"Sinkhorn iterations per step {iters}")
    print()
    rows = {"after": run(args, legacy=False)}
    if args.compare:
        rows = {"before": run(args, legacy=True), **rows}
    keys = ["forward", "cost", "sinkhorn", "iters", "discretise", "backward", "optimiser", "total",
            "roda_loss (cold, no grad)"]
    print(f"one step: {args.images}+{args.images} images vs {args.bank} bank entries, {args.threads} threads "
          f"(seconds per step, mean of {args.repeats}; iters = Sinkhorn iterations)")
    print(f"{'stage':28s}" + "".join(f"{k:>10s}" for k in rows))
    for k in keys:
        print(f"{k:28s}" + "".join(f"{rows[r].get(k, float('nan')):10.3f}" for r in rows))


if __name__ == "__main__":
    main()
