"""Time lib.ot.transport.sinkhorn_log against POT's ot.bregman.sinkhorn_log on a RoDA-sized problem.

The default problem is one RoDA minibatch: 10 images x 784 patches = 7840 target rows against a 2500-entry
memory bank, L2 cost normalised by its mean, eps = 0.05, uniform marginals. Both solvers stop on the same
quantity (``||gamma^T 1 - b||_2 < tol``) checked every 10 iterations, so the iteration counts match and the
time ratio is a per-iteration speed ratio. Prints figures only (no assertions on time).

    python benchmarks/bench_sinkhorn.py                          # clustered synthetic features, POT torch
    python benchmarks/bench_sinkhorn.py --pot-backend both       # also POT with numpy float64 (slow, minutes)
    python benchmarks/bench_sinkhorn.py --cost-file cost.pt      # a saved (N, M) cost tensor
    python benchmarks/bench_sinkhorn.py --features real          # real patch features (hook, see real_cost)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.ot.transport import normalize_cost, pairwise_cost, sinkhorn_log  # noqa: E402


def synthetic_features(kind: str, n_target: int, n_bank: int, dim: int, seed: int):
    """``gaussian``: i.i.d. N(0, I) features (nearly flat cost, optimistic convergence); ``clustered``: a
    40-component mixture for the bank and a shifted, noisier draw of it for the target (a corrupted batch)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n_target, dim, generator=g), torch.randn(n_bank, dim, generator=g)
    centres = 2.0 * torch.randn(40, dim, generator=g)
    bank = centres[torch.randint(40, (n_bank,), generator=g)] + torch.randn(n_bank, dim, generator=g)
    target = centres[torch.randint(40, (n_target,), generator=g)] + 1.3 * torch.randn(n_target, dim, generator=g)
    return target + 0.3, bank


def real_features(n_target: int = 7840, n_bank: int = 2500, corruption: str = "gaussian_noise", seed: int = 0):
    """Real PatchCore features on the embedded ELPV data with the bundled MobileNetV2.

    Target: the patches of ``n_target / 784`` shifted test images (a RoDA minibatch); bank: a greedy
    coreset of ``n_bank`` patches from clean training cells. Returns (model, target batch images, bank)."""
    from lib.common import backbones, data
    from lib.experiments import roda_steps
    from lib.roda.patchcore import PatchCore

    ext = backbones.load_backbone("mobilenet_v2")
    task = data.load_task("elpv")
    n_images = max(1, n_target // 784)
    model = PatchCore(ext, coreset_ratio=1.0, max_bank=n_bank, seed=seed, device="cpu")
    train = roda_steps.dataset(task, data.subsample(task.train, 40, seed))
    model.fit(data.make_loader(train, batch_size=16))
    test = roda_steps.dataset(task, data.subsample(task.test, n_images, seed), corruption, 5, seed)
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    return model, images


def real_cost(args) -> torch.Tensor:
    """Cost between the patches of one real shifted minibatch and a real memory bank (see real_features)."""
    model, images = real_features(args.n_target, args.n_bank, seed=args.seed)
    with torch.no_grad():
        target = model.embed(images).reshape(-1, model.bank.shape[1])
    args._model, args._images = model, images
    return pairwise_cost(target, model.bank, args.cost)


def time_adaptation_step(model, images, repeats: int = 3) -> float:
    """Seconds per RoDA adaptation step (augment, features with gradient, OT, Eq. 6 loss, SGD step)."""
    from lib.roda.adaptation import AdaptConfig, adapt, bn_state, restore_bn_state

    class Batch(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return dict(image=images[i], mask=torch.zeros(1, *images.shape[-2:]), label=0, path=str(i))

    source = bn_state(model.extractor)
    config = AdaptConfig(epochs=repeats, batch_size=len(images), loss=dict(eps=0.05))
    t = time.perf_counter()
    adapt(model, Batch(), config, show_progress=False)
    restore_bn_state(model.extractor, source)
    return (time.perf_counter() - t) / repeats


def build_cost(args) -> torch.Tensor:
    if args.cost_file:
        obj = torch.load(args.cost_file, map_location="cpu")
        C = obj["cost"] if isinstance(obj, dict) else obj
        C = torch.as_tensor(C)
    elif args.features == "real":
        C = real_cost(args)
    else:
        x, y = synthetic_features(args.features, args.n_target, args.n_bank, args.dim, args.seed)
        C = pairwise_cost(x, y, args.cost)
    C, _ = normalize_cost(C.float(), args.cost_norm)
    return C


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-target", type=int, default=7840)
    p.add_argument("--n-bank", type=int, default=2500)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--features", choices=["clustered", "gaussian", "real"], default="clustered")
    p.add_argument("--cost-file", default=None, help="a .pt file holding an (N, M) cost tensor (or {'cost': C})")
    p.add_argument("--cost", choices=["l2", "sqeuclidean", "cosine"], default="l2")
    p.add_argument("--cost-norm", choices=["mean", "median", "max", "none"], default="mean")
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--method", choices=["absorb", "log", "both"], default="both")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--pot-backend", choices=["torch", "numpy", "both", "none"], default="torch",
                   help="POT on torch tensors (same dtype as ours) and/or numpy float64 (POT's usual input)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    C = build_cost(args).to(device=args.device, dtype=dtype)
    N, M = C.shape
    print(f"problem: {N} x {M}, cost {args.cost}/{args.cost_norm} in [{C.min():.3f}, {C.max():.3f}], eps {args.eps}, "
          f"tol {args.tol:g}, {args.dtype}, device {args.device}, torch threads {args.threads}")

    def sync():
        if C.is_cuda:
            torch.cuda.synchronize()

    ours = {}
    for method in (["absorb", "log"] if args.method == "both" else [args.method]):
        sync()
        t = time.perf_counter()
        P, info = sinkhorn_log(C, args.eps, tol=args.tol, max_iter=args.max_iter, method=method, warn=False)
        sync()
        ours[method] = (time.perf_counter() - t, info, P)
        print(f"ours[{method:6s}]  {ours[method][0]:8.2f} s  iters {info['n_iter']:5d}  marginal err "
              f"{info['marginal_error']:.2e}  converged {info['converged']}  absorptions {info['n_absorb']}")

    backends = {"both": ["torch", "numpy"], "none": []}.get(args.pot_backend, [args.pot_backend])
    if backends:
        import ot

    for backend in backends:
        if backend == "numpy":
            Cp, a, b, name = C.double().cpu().numpy(), [], [], "POT numpy float64"
        else:
            Cp, name = C, f"POT torch {args.dtype}"
            a = b = torch.tensor([], dtype=dtype, device=C.device)
        sync()
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Pp, log = ot.bregman.sinkhorn_log(a, b, Cp, args.eps, numItermax=args.max_iter, stopThr=args.tol, log=True)
        sync()
        tp = time.perf_counter() - t
        Pp = torch.as_tensor(np.asarray(Pp) if backend == "numpy" else Pp).to(torch.float64).cpu()
        print(f"{name:22s} {tp:8.2f} s  iters {int(log['niter']) + 1:5d}")
        for method, (to, _info, P) in ours.items():
            Pd = P.to(torch.float64).cpu()
            diff = (Pd - Pp).abs().max().item()
            same_row = (Pd.argmax(1) == Pp.argmax(1)).double().mean().item()
            same_col = (Pd.argmax(0) == Pp.argmax(0)).double().mean().item()
            print(f"    vs ours[{method:6s}]: time ratio {tp / to:6.1f}x   max |plan diff| {diff:.2e} "
                  f"(max plan entry {Pp.max().item():.2e})   same row/col argmax {same_row:.4f}/{same_col:.4f}")

    if getattr(args, "_model", None) is not None:
        step = time_adaptation_step(args._model, args._images)
        print(f"RoDA adaptation step ({len(args._images)} images + {len(args._images)} augmented views, "
              f"bank {args.n_bank}): {step:.2f} s per step")


if __name__ == "__main__":
    main()
