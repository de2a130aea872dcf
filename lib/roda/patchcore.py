"""PatchCore (Roth et al., CVPR 2022) as RoDA uses it: patch features, coreset memory bank, scoring.

The feature path follows the official implementation (``amazon-science/patchcore-inspection``):

1. the backbone's two taps at strides 8 and 16 (WRN-50 ``layer2``/``layer3``, or their analogues in the
   bundled networks, see :mod:`lib.common.backbones`);
2. 3x3 local aggregation: every tap is unfolded into 3x3 neighbourhoods (zero padding), giving a
   ``C*9`` vector per location;
3. the stride-16 neighbourhoods are bilinearly interpolated (``align_corners=False``) onto the stride-8 grid;
4. each layer's ``C*9`` vector is adaptive-average-pooled to ``pretrain_dim``, the two are stacked and
   pooled again to ``target_dim`` (this is the official "Preprocessing"/"Aggregator", not a concatenation).

The memory bank is an approximate greedy coreset (RoDA Eq. 1):

    M = argmin_{M subset D_s} max_{z in D_s} min_{m in M} ||m - z||,   |M| <= N_M

selected in a 128-d random projection with O(N) memory (never an N x N matrix). A test patch's score is
its distance to the nearest bank entry; an image's score is the maximum patch score (RoDA Eq. 2):

    s_i = max_p min_k ||z_ip - m_k||

Anomaly maps are the patch scores bilinearly upsampled to the input size and Gaussian-blurred (sigma 4).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from lib.common.utils import progress, resolve_device, torch_load_fields, torch_save

BANK_FORMAT = "patchcore-bank/2"  # 2: built with BatchNorm in eval mode (1 could hold batch-statistics banks)

#: (pretrain_dim, target_dim) per backbone. The papers' ResNets keep the official 1024/1024. The bundled
#: networks have 4-10x fewer channels (e.g. MobileNetV2: 32 and 96), so pooling them *up* to 1024 would
#: only repeat values; 256/256 keeps 128 dims per layer after the merge.
DEFAULT_DIMS = {"wide_resnet50_2": (1024, 1024), "resnet18": (1024, 1024)}
SMALL_BACKBONE_DIMS = (256, 256)


class BankError(ValueError):
    """A memory-bank file that is missing, corrupted, empty or built for another backbone."""


class StaleBankError(BankError):
    """A memory-bank file built from other data or settings than the ones asked for."""


# ----------------------------------------------------------------------------------------------------
# Patch features
# ----------------------------------------------------------------------------------------------------


def local_neighbourhoods(feature: torch.Tensor, patch_size: int = 3) -> torch.Tensor:
    """(B, C, h, w) -> (B, h, w, C * p * p): each location's p x p neighbourhood (zero padded), C-major."""
    b, c, h, w = feature.shape
    unfolded = F.unfold(feature, kernel_size=patch_size, padding=(patch_size - 1) // 2, stride=1)
    return unfolded.reshape(b, c * patch_size * patch_size, h, w).permute(0, 2, 3, 1)


@functools.lru_cache(maxsize=64)
def _window_tables(length: int, size: int, device: str):
    """Index tables of adaptive average pooling ``length -> size`` and of its transpose.

    Output ``j`` averages inputs ``start_j .. end_j - 1`` with ``start_j = floor(j L / size)`` and
    ``end_j = ceil((j + 1) L / size)`` (torch's windows). Forward: row ``r`` of ``idx`` holds input
    ``start_j + r`` of every output (``mask`` 0 past the window's end). Transpose: row ``r`` of ``idx_t``
    holds the ``r``-th output whose window contains input ``i`` (``mask_t`` 0 where there is none).
    """
    j = torch.arange(size)
    start = (j * length) // size
    end = ((j + 1) * length + size - 1) // size
    width = end - start
    rows = torch.arange(int(width.max()))[:, None]
    idx = torch.minimum(start[None] + rows, end[None] - 1)
    mask = (rows < width[None]).float()
    owners = [[] for _ in range(length)]
    for out, (a, b) in enumerate(zip(start.tolist(), end.tolist())):
        for i in range(a, b):
            owners[i].append(out)
    depth = max(len(o) for o in owners)
    idx_t = torch.tensor([[o[min(r, len(o) - 1)] for o in owners] for r in range(depth)])
    mask_t = torch.tensor([[float(r < len(o)) for o in owners] for r in range(depth)])
    return tuple(t.to(device) for t in (idx, mask, width.float(), idx_t, mask_t))


def _gather_sum(x: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_r x[:, idx[r]] * mask[r] along dim 1, the rows added in order (no scatter, no zero fill)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    acc = x.index_select(1, idx[0])
    for r in range(1, idx.shape[0]):
        term = x.index_select(1, idx[r])
        if not bool(mask[r].all()):
            term.mul_(mask[r].to(x.dtype).view(shape))
        acc.add_(term)
    return acc


class _WindowMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size):
        idx, mask, width, idx_t, mask_t = _window_tables(x.shape[1], size, str(x.device))
        ctx.save_for_backward(width, idx_t, mask_t)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return _gather_sum(x, idx, mask).div_(width.to(x.dtype).view(shape))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        width, idx_t, mask_t = ctx.saved_tensors
        shape = (1, -1) + (1,) * (grad.dim() - 2)
        return _gather_sum(grad / width.to(grad.dtype).view(shape), idx_t, mask_t), None


def adaptive_mean_dim1(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool1d`` along dim 1 of ``x`` (B, L, ...) -> (B, size, ...), bit for bit.

    Output ``j`` is the mean of inputs ``floor(j L / size) .. ceil((j + 1) L / size) - 1``. The windows are
    at most a few inputs wide, so the mean is a handful of ``index_select`` slices summed in order (the
    order of torch's own kernel, hence equal bits) instead of a copy that moves dim 1 last. The gradient
    is the transposed pooling done the same way, by gathers (each input lies in one or two windows),
    which is several times faster than autograd's scatter (``index_add``) into a zero-filled tensor.
    """
    return _WindowMean.apply(x, int(size))


def aggregate(features: list[torch.Tensor], pretrain_dim: int, target_dim: int, patch_size: int = 3):
    """Official PatchCore aggregation of several taps into one ``target_dim`` vector per location.

    Returns the patch features (B, h*w, target_dim) on the grid (h, w) of the first (finest) tap.

    Same map as the official order (neighbourhoods -> bilinear onto the finest grid -> pool to
    ``pretrain_dim`` -> stack -> pool to ``target_dim``), computed in a cheaper order that is equal up to
    float round-off: the pooling is linear and acts on each location alone, bilinear interpolation
    mixes locations only, so they commute and each coarse tap is pooled *before* it is interpolated
    (``pretrain_dim`` channels interpolated instead of ``C * p * p``); the pooling runs on channel-first
    tensors (:func:`adaptive_mean_dim1`), with no transposed copy of the ``C * p * p`` neighbourhoods.
    """
    h, w = features[0].shape[-2:]
    per_layer = []
    for f in features:
        b, _, hl, wl = f.shape
        nb = F.unfold(f, kernel_size=patch_size, padding=(patch_size - 1) // 2, stride=1)  # (B, C*p*p, hl*wl)
        pooled = adaptive_mean_dim1(nb, pretrain_dim).reshape(b, pretrain_dim, hl, wl)
        if (hl, wl) != (h, w):
            pooled = F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=False)
        per_layer.append(pooled.reshape(b, pretrain_dim, h * w))
    merged = adaptive_mean_dim1(torch.cat(per_layer, dim=1), target_dim)  # (B, target_dim, h*w)
    return merged.transpose(1, 2).contiguous(), (h, w)


# ----------------------------------------------------------------------------------------------------
# Coreset and nearest neighbours
# ----------------------------------------------------------------------------------------------------


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(-1)


def faiss_available() -> bool:
    """Whether the optional ``faiss`` package imports (``pip install faiss-cpu``); never required."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _nearest_faiss(queries: torch.Tensor, bank: torch.Tensor):
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank.detach().float().cpu().numpy()))
    d2, idx = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), 1)
    d = torch.from_numpy(d2[:, 0]).clamp_min_(0.0).sqrt_().to(queries.device)
    return d, torch.from_numpy(idx[:, 0]).long().to(queries.device)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk: int | None = None,
                      max_elements: int = 2**22, backend: str = "torch"):
    """Distance of every query to its nearest bank entry, and that entry's index, in query chunks.

    ``min_k ||q - m_k||^2 = ||q||^2 + min_k (||m_k||^2 - 2 q.m_k)``: one fused ``addmm`` per chunk, the
    query norm added after the minimum. Memory is ``chunk x |bank|`` at a time; ``chunk`` defaults to
    what fits in ``max_elements`` (16 MB of float32: cache-sized blocks are faster than large ones).
    ``backend="faiss"`` uses ``faiss.IndexFlatL2`` (exact search; optional package, CPU, no gradient).
    """
    if bank.numel() == 0 or bank.shape[0] == 0:
        raise BankError("the memory bank is empty: fit PatchCore on at least one normal image first")
    if backend == "faiss":
        if not faiss_available():
            raise ImportError("backend='faiss' needs the optional faiss package: pip install faiss-cpu "
                              "(or use backend='torch', the default)")
        return _nearest_faiss(queries, bank)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'faiss', not {backend!r}")
    if chunk is None:
        chunk = max(1, max_elements // bank.shape[0])
    bank_sq = _sq_norms(bank)
    dists, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk]
        d2, i = torch.addmm(bank_sq, q, bank.T, alpha=-2.0).min(dim=1)
        dists.append((d2 + _sq_norms(q)).clamp_min(0.0).sqrt())
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


def coverage_counts(features: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """How many of ``features`` (the training patches) have each bank entry as nearest neighbour, at least 1.

    A greedy coreset spreads its entries evenly over the feature space, not by frequency; these counts are
    the mass each entry stands for (the column marginal of the robust RoDA's ``loss.weights="coverage"``)."""
    _, idx = nearest_distances(features, bank)
    return torch.bincount(idx.cpu(), minlength=bank.shape[0]).clamp_min(1).float()


def greedy_coreset(
    features: torch.Tensor,
    n: int,
    proj_dim: int | None = 128,
    n_starts: int = 10,
    start: int | None = None,
    seed: int = 0,
    show_progress: bool = False,
) -> torch.Tensor:
    """Indices of an ``n``-point greedy (farthest-point) coreset, O(N) memory.

    * ``start=None`` (default): the official *approximate* greedy sampler. ``n_starts`` random points
      are drawn; every point's initial distance to the coreset is its mean distance to those points;
      then each step takes the point farthest from the coreset and updates the distances with a single
      N x 1 computation.
    * ``start=i``: the exact farthest-point traversal from point ``i`` (``i`` is the first centre).

    With ``proj_dim`` the distances are computed in a seeded Gaussian random projection to ``proj_dim``
    dimensions (Johnson-Lindenstrauss; the official code uses an untrained ``nn.Linear`` instead).

    The loop keeps squared distances (same order, no square roots) in a running minimum ``d2`` and,
    per step, writes ``||x||^2 - 2 X x_i`` with one fused matrix-vector product (``addmv``) into a
    preallocated buffer, adds ``||x_i||^2`` and takes the elementwise minimum in place: four passes over
    N floats next to the N x proj_dim product, no allocation. The chosen index stays a device tensor,
    so a GPU never waits for the host inside the loop.
    """
    N = features.shape[0]
    if N == 0:
        raise BankError("no features to select a coreset from: the training set is empty")
    n = int(min(max(n, 1), N))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = features.detach().float()
    if proj_dim is not None and proj_dim < x.shape[1]:
        mapping = torch.randn(x.shape[1], proj_dim, generator=gen) / math.sqrt(proj_dim)
        x = x @ mapping.to(x.device)
    x = x.contiguous()
    x_sq = _sq_norms(x)
    buf = torch.empty_like(x_sq)

    def sq_dist_to(i: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = ||x - x_i||^2 for every x; ``i`` a one-element index tensor."""
        torch.addmv(x_sq, x, x.index_select(0, i)[0], alpha=-2.0, out=out)
        return out.add_(x_sq.index_select(0, i))

    selected = torch.empty(n, dtype=torch.long, device=x.device)
    if start is None:
        starts = torch.randperm(N, generator=gen)[: min(n_starts, N)].to(x.device)
        mean_dist = torch.zeros_like(x_sq)
        for k in range(len(starts)):
            mean_dist.add_(sq_dist_to(starts[k : k + 1], buf).clamp_min_(0.0).sqrt_())
        min_d2 = mean_dist.div_(len(starts)).square_()
        first = 0
    else:
        first_idx = torch.tensor([int(start)], device=x.device)
        min_d2 = sq_dist_to(first_idx, torch.empty_like(x_sq))
        min_d2.index_fill_(0, first_idx, -1.0)
        selected[0] = int(start)
        first = 1
    steps = range(first, n)
    for step in progress(steps, desc="coreset", leave=False) if show_progress else steps:
        i = torch.argmax(min_d2).view(1)
        selected[step : step + 1] = i
        torch.minimum(min_d2, sq_dist_to(i, buf), out=min_d2)
        min_d2.index_fill_(0, i, -1.0)  # chosen: never again (round-off can leave it a hair above 0)
    return selected.cpu()


def coverage_radius(features: torch.Tensor, coreset: torch.Tensor) -> float:
    """max_z min_m ||z - m||: the quantity the coreset of Eq. 1 minimises."""
    return float(nearest_distances(features, coreset)[0].max())


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


class PatchCore:
    """Memory-bank anomaly detector on top of a :class:`lib.common.backbones.FeatureExtractor`.

    Parameters
    ----------
    extractor: the backbone (returns the two tap maps for an image batch in [0, 1]).
    coreset_ratio: fraction of training patches kept in the bank (official runs: 0.1 and 0.01).
    max_bank: optional cap on the bank size (keeps OT problems of RoDA bounded).
    pretrain_dim, target_dim: aggregation sizes (``None``: from ``DEFAULT_DIMS``).
    smoothing_sigma: Gaussian blur of the anomaly map (official: 4).
    """

    def __init__(self, extractor, coreset_ratio: float = 0.01, max_bank: int | None = None,
                 pretrain_dim: int | None = None, target_dim: int | None = None, patch_size: int = 3,
                 proj_dim: int | None = 128, n_starts: int = 10, smoothing_sigma: float = 4.0,
                 seed: int = 0, device="auto"):
        self.extractor = extractor
        self.device = resolve_device(device)
        dims = DEFAULT_DIMS.get(getattr(extractor, "name", ""), SMALL_BACKBONE_DIMS)
        self.pretrain_dim = pretrain_dim or dims[0]
        self.target_dim = target_dim or dims[1]
        self.patch_size = patch_size
        self.coreset_ratio, self.max_bank = coreset_ratio, max_bank
        self.proj_dim, self.n_starts = proj_dim, n_starts
        self.smoothing_sigma = smoothing_sigma
        self.seed = seed
        self.bank: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None
        self.preprocessing: dict = {}
        self.n_train_patches = 0
        self.coverage: torch.Tensor | None = None  # training patches per bank entry (fit(coverage=True))

    # -- features ------------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features (B, h*w, D). Differentiable when the extractor is in differentiable mode."""
        maps = self.extractor(images.to(self.device))
        feats, self.grid = aggregate(list(maps), self.pretrain_dim, self.target_dim, self.patch_size)
        return feats

    @torch.no_grad()
    def embed_loader(self, loader, desc: str = "features") -> torch.Tensor:
        out = [self.embed(batch["image"]).cpu() for batch in progress(loader, desc=desc, leave=False)]
        return torch.cat(out)

    # -- fitting -------------------------------------------------------------------------------------
    def fit(self, loader, preprocessing: dict | None = None, coverage: bool = False) -> PatchCore:
        """Build the bank from normal images: all patch features, then the coreset. ``coverage``: also keep
        :func:`coverage_counts` of the training patches in ``self.coverage`` (the column marginal of the
        robust RoDA's ``weights="coverage"``; one nearest-neighbour pass more)."""
        feats = self.embed_loader(loader, desc="bank features")
        feats = feats.reshape(-1, feats.shape[-1])
        if feats.shape[0] == 0:
            raise BankError("no training patches: the training loader is empty")
        self.n_train_patches = feats.shape[0]
        n = max(1, int(round(self.coreset_ratio * feats.shape[0])))
        if self.max_bank:
            n = min(n, self.max_bank)
        idx = greedy_coreset(feats.to(self.device), n, self.proj_dim, self.n_starts, seed=self.seed,
                             show_progress=True)
        self.bank = feats[idx.cpu()].to(self.device).contiguous()
        self.coverage = coverage_counts(feats.to(self.device), self.bank) if coverage else None
        self.preprocessing = dict(preprocessing or {})
        return self

    # -- scoring -------------------------------------------------------------------------------------
    def _check_bank(self):
        if self.bank is None or self.bank.shape[0] == 0:
            raise BankError("the memory bank is empty: call fit() on normal images (or PatchCore.load) first")

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) nearest-neighbour distances of each patch to the bank."""
        self._check_bank()
        with torch.no_grad():
            feats = self.embed(images)
        b = feats.shape[0]
        d, _ = nearest_distances(feats.reshape(-1, feats.shape[-1]), self.bank)
        return d.reshape(b, *self.grid)

    def anomaly_maps(self, patch_scores: torch.Tensor, size) -> np.ndarray:
        """Bilinear upsampling to ``size`` (h, w) and Gaussian blur (sigma ``smoothing_sigma``)."""
        up = F.interpolate(patch_scores[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        up = up.cpu().numpy()
        if self.smoothing_sigma:
            up = np.stack([gaussian_filter(m, sigma=self.smoothing_sigma) for m in up])
        return up.astype(np.float32)

    def predict(self, loader, desc: str = "scoring", keep_maps: bool = True) -> dict:
        """Scores of every image in ``loader``: ``scores``, ``labels``, ``maps``, ``masks``, ``paths``."""
        scores, labels, maps, masks, paths, patch = [], [], [], [], [], []
        for batch in progress(loader, desc=desc, leave=False):
            ps = self.patch_scores(batch["image"])
            scores.append(ps.flatten(1).max(1).values.cpu())
            labels.append(torch.as_tensor(batch["label"]))
            paths.extend(batch["path"])
            patch.append(ps.cpu())
            if keep_maps:
                maps.append(self.anomaly_maps(ps, batch["image"].shape[-2:]))
                masks.append(batch["mask"][:, 0].numpy().astype(bool))
        out = dict(scores=torch.cat(scores).numpy(), labels=torch.cat(labels).numpy(), paths=paths,
                   patch_scores=torch.cat(patch).numpy())
        if keep_maps:
            out["maps"], out["masks"] = np.concatenate(maps), np.concatenate(masks)
        return out

    # -- persistence ---------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return dict(
            format=BANK_FORMAT,
            backbone=dict(getattr(self.extractor, "normalization", {}) or {}, name=getattr(self.extractor, "name", "?"),
                          layers=list(getattr(self.extractor, "layers", []))),
            pretrain_dim=self.pretrain_dim, target_dim=self.target_dim, patch_size=self.patch_size,
            coreset_ratio=self.coreset_ratio, max_bank=self.max_bank, grid=self.grid, seed=self.seed,
            smoothing_sigma=self.smoothing_sigma, n_train_patches=self.n_train_patches,
            preprocessing=self.preprocessing,
        )

    def save(self, path, cache_key: str | None = None) -> Path:
        """One file: the bank and everything needed to use it (backbone identity, preprocessing, dims), and
        the ``cache_key`` of what built it (:mod:`lib.common.cache`; checked by :meth:`load`)."""
        self._check_bank()
        return torch_save(dict(bank=self.bank.cpu(), meta=dict(self.metadata(), cache_key=cache_key)), path)

    @classmethod
    def load(cls, path, extractor, device="auto", cache_key: str | None = None) -> PatchCore:
        """Load a bank; refuse it when it was built with another backbone than ``extractor``, or (given
        ``cache_key``) from other data or settings than the caller's (:class:`StaleBankError`)."""
        path = Path(path)
        if not path.is_file():
            raise BankError(f"bank file {path} does not exist: build it with PatchCore.fit(...).save(path)")
        fields = torch_load_fields(path, ("bank", "meta"), check=lambda b: b["meta"].get("format") == BANK_FORMAT)
        if fields is None:
            raise BankError(f"bank file {path} is corrupted or not a PatchCore bank of format {BANK_FORMAT}: "
                            "delete it and rebuild with PatchCore.fit(...).save(path)")
        bank, meta = fields
        expected = dict(getattr(extractor, "normalization", {}) or {}, name=getattr(extractor, "name", "?"),
                        layers=list(getattr(extractor, "layers", [])))
        if meta["backbone"] != expected:
            diff = {k: (meta["backbone"].get(k), expected.get(k)) for k in set(meta["backbone"]) | set(expected)
                    if meta["backbone"].get(k) != expected.get(k)}
            name = meta["backbone"].get("name")
            raise BankError(f"bank {path} was built with another backbone (bank vs. given: {diff}): load the "
                            f"backbone {name!r} with the same weights/layers, or rebuild the bank")
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise BankError(f"bank file {path} holds an empty bank: rebuild it from normal images")
        if cache_key is not None and meta.get("cache_key") != cache_key:
            raise StaleBankError(f"bank file {path} was built from other data or settings (cache key "
                                 f"{str(meta.get('cache_key'))[:12]} != {cache_key[:12]}): rebuild it")
        model = cls(extractor, coreset_ratio=meta["coreset_ratio"], max_bank=meta["max_bank"],
                    pretrain_dim=meta["pretrain_dim"], target_dim=meta["target_dim"], patch_size=meta["patch_size"],
                    smoothing_sigma=meta["smoothing_sigma"], seed=meta["seed"], device=device)
        model.bank = bank.to(model.device)
        model.grid = tuple(meta["grid"]) if meta["grid"] else None
        model.preprocessing = meta["preprocessing"]
        model.n_train_patches = meta["n_train_patches"]
        return model
