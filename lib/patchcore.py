"""PatchCore (Roth et al., CVPR 2022) as RoDA uses it: patch features, coreset memory bank, scoring.

The feature path follows the official implementation (``amazon-science/patchcore-inspection``):

1. the backbone's two taps at strides 8 and 16 (WRN-50 ``layer2``/``layer3``, or their analogues in the
   bundled networks, see :mod:`lib.backbones`);
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

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from .utils import progress, resolve_device, torch_save

BANK_FORMAT = "patchcore-bank/1"

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


def aggregate(features: list[torch.Tensor], pretrain_dim: int, target_dim: int, patch_size: int = 3):
    """Official PatchCore aggregation of several taps into one ``target_dim`` vector per location.

    Returns the patch features (B, h*w, target_dim) on the grid (h, w) of the first (finest) tap.
    """
    h, w = features[0].shape[-2:]
    per_layer = []
    for f in features:
        nb = local_neighbourhoods(f, patch_size)  # (B, h_l, w_l, C*9)
        if nb.shape[1:3] != (h, w):
            # interpolate every neighbourhood element onto the finest grid
            nb = F.interpolate(nb.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)
            nb = nb.permute(0, 2, 3, 1)
        b = nb.shape[0]
        flat = nb.reshape(b * h * w, 1, -1)
        per_layer.append(F.adaptive_avg_pool1d(flat, pretrain_dim))  # (N, 1, pretrain_dim)
    stacked = torch.cat(per_layer, dim=1).reshape(b * h * w, 1, -1)
    merged = F.adaptive_avg_pool1d(stacked, target_dim).reshape(b, h * w, target_dim)
    return merged, (h, w)


# ----------------------------------------------------------------------------------------------------
# Coreset and nearest neighbours
# ----------------------------------------------------------------------------------------------------


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(-1)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk: int | None = None, max_elements: int = 2**25):
    """Distance of every query to its nearest bank entry, and that entry's index, in query chunks.

    Memory is ``chunk x |bank|`` at a time; ``chunk`` defaults to what fits in ``max_elements``.
    """
    if bank.numel() == 0 or bank.shape[0] == 0:
        raise BankError("the memory bank is empty: fit PatchCore on at least one normal image first")
    if chunk is None:
        chunk = max(1, max_elements // bank.shape[0])
    bank_sq = _sq_norms(bank)
    dists, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk]
        d2 = _sq_norms(q)[:, None] - 2.0 * q @ bank.T + bank_sq[None, :]
        d2, i = d2.min(dim=1)
        dists.append(d2.clamp_min(0.0).sqrt())
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


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
    x_sq = _sq_norms(x)

    def dist_to(i: int) -> torch.Tensor:
        return (x_sq - 2.0 * x @ x[i] + x_sq[i]).clamp_min_(0.0).sqrt_()

    if start is None:
        starts = torch.randperm(N, generator=gen)[: min(n_starts, N)].tolist()
        min_dist = torch.stack([dist_to(i) for i in starts]).mean(0)
        selected = []
    else:
        selected = [int(start)]
        min_dist = dist_to(int(start))
        min_dist[int(start)] = -1.0
    steps = range(n - len(selected))
    for _ in progress(steps, desc="coreset", leave=False) if show_progress else steps:
        i = int(torch.argmax(min_dist))
        selected.append(i)
        torch.minimum(min_dist, dist_to(i), out=min_dist)
        min_dist[i] = -1.0  # chosen: never again (float round-off can leave it a hair above 0)
    return torch.tensor(selected, dtype=torch.long)


def coverage_radius(features: torch.Tensor, coreset: torch.Tensor) -> float:
    """max_z min_m ||z - m||: the quantity the coreset of Eq. 1 minimises."""
    return float(nearest_distances(features, coreset)[0].max())


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


class PatchCore:
    """Memory-bank anomaly detector on top of a :class:`lib.backbones.FeatureExtractor`.

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
    def fit(self, loader, preprocessing: dict | None = None) -> "PatchCore":
        """Build the bank from normal images: all patch features, then the coreset."""
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
        the ``cache_key`` of what built it (:mod:`lib.cache`; checked by :meth:`load`)."""
        self._check_bank()
        return torch_save(dict(bank=self.bank.cpu(), meta=dict(self.metadata(), cache_key=cache_key)), path)

    @classmethod
    def load(cls, path, extractor, device="auto", cache_key: str | None = None) -> "PatchCore":
        """Load a bank; refuse it when it was built with another backbone than ``extractor``, or (given
        ``cache_key``) from other data or settings than the caller's (:class:`StaleBankError`)."""
        path = Path(path)
        if not path.is_file():
            raise BankError(f"bank file {path} does not exist: build it with PatchCore.fit(...).save(path)")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=False)
            bank, meta = blob["bank"], blob["meta"]
            assert meta.get("format") == BANK_FORMAT
        except Exception as exc:  # noqa: BLE001 - any failure here means the file is unusable
            raise BankError(f"bank file {path} is corrupted or not a PatchCore bank ({type(exc).__name__}): "
                            "delete it and rebuild with PatchCore.fit(...).save(path)") from None
        expected = dict(getattr(extractor, "normalization", {}) or {}, name=getattr(extractor, "name", "?"),
                        layers=list(getattr(extractor, "layers", [])))
        if meta["backbone"] != expected:
            diff = {k: (meta["backbone"].get(k), expected.get(k)) for k in set(meta["backbone"]) | set(expected)
                    if meta["backbone"].get(k) != expected.get(k)}
            raise BankError(f"bank {path} was built with another backbone (bank vs. given: {diff}): load the "
                            f"backbone {meta['backbone'].get('name')!r} with the same weights/layers, or rebuild the bank")
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
