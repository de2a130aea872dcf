"""BatchNorm statistics for a shifted target: AdaBN, and AdaBN referenced to the training images.

A BatchNorm layer in eval mode computes ``y = gamma * (x - mu) / sqrt(var + e) + beta`` with running
statistics ``(mu, var)``. In this project those are the ImageNet statistics of the pretrained encoder (the
*reference* state): the memory bank was built with them, on the category's clean training images.

* **AdaBN** (Li et al. 2016; Schneider et al. 2020 for corruptions), :func:`reestimate_bn_stats`: replace
  ``(mu, var)`` by the moments ``(mu_t, var_t)`` of the layer's input on the target images. This normalises
  the target to zero mean and unit variance per channel. Clean training images do not look like that under
  ImageNet statistics, so AdaBN moves even an unshifted target away from the bank's feature space.
* **Training-referenced AdaBN**, :func:`match_bn_stats` (``bn_init="matched"``): choose ``(mu', var')`` so
  that the target's normalised input has the per-channel moments that the clean *training* images' input
  has under the reference state. With training moments ``(mu_r, var_r)`` at the layer's input::

      var_t / (var' + e)                  = var_r / (var + e)
      (mu_t - mu') / sqrt(var' + e)       = (mu_r - mu) / sqrt(var + e)

  so ``var' + e = var_t (var + e) / var_r`` and ``mu' = mu_t - sqrt(var' + e) (mu_r - mu) / sqrt(var + e)``
  (``var_r`` floored at 1e-12 for channels the training images never excite; ``var'`` at 0: such a channel is
  held at its training value, and a channel constant in both keeps its output although its statistics
  differ). A target distributed like the training images gives ``(mu', var') = (mu, var)``: the reference
  state, exactly. It undoes a per-channel affine change of each layer's input (what brightness and contrast
  are after the first convolution) and nothing else; ``gamma, beta`` are untouched, so RoDA's alignment can
  run after it.

* **Gated matching**, :func:`gate_bn_stats` (``bn_init="gated"``): the matched statistics are kept only when
  they bring the target nearer the bank, measured with the quantity the alignment itself descends, the mean
  nearest-bank distance over every patch of the (unaugmented) target split::

      d(state) = 1/N sum_i min_j ||z_i(state) - m_j||,     keep matched  iff  d(matched) < d(source)

  Matching undoes a per-channel affine change; a shift that is not one (blur, noise) can leave the matched
  target *farther* from the bank than the source state did, and the alignment then starts from a worse
  place. Ties keep the source state. No labels are read; one pass more over the split per state.

Both estimators run the layers in order on the target batches, each layer normalising the batch with the
statistics that its own batch gives (as AdaBN's train-mode pass does), and keep the statistics of the whole
split (cumulative moments, every image once, no augmentation). No labels are read.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from lib.ot.transport import pairwise_cost


class BNStatsError(ValueError):
    """Bad input to a BatchNorm-statistics estimator; the message names the fix."""


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, C, H, W) -> per-channel sum, sum of squares (float64) and the count per channel."""
    x = x.detach().double()
    return x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), x.numel() // x.shape[1]


def _mean_var(s1, s2, n) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance from the sums of :func:`_moments`."""
    mean = s1 / n
    return mean, (s2 / n - mean * mean).clamp_min(0)


class _MomentHooks:
    """Forward pre-hooks on ``modules`` that accumulate the per-channel moments of each module's input;
    ``on_batch(k, mean, var)`` (optional) runs before module ``k`` normalises the batch."""

    def __init__(self, modules, on_batch=None):
        self.sums = [[0.0, 0.0, 0] for _ in modules]
        self.handles = [m.register_forward_pre_hook(self._hook(k, on_batch)) for k, m in enumerate(modules)]

    def _hook(self, k, on_batch):
        def hook(module, args):
            s1, s2, n = _moments(args[0])
            acc = self.sums[k]
            acc[0], acc[1], acc[2] = acc[0] + s1, acc[1] + s2, acc[2] + n
            if on_batch is not None:
                on_batch(k, *_mean_var(s1, s2, n))
        return hook

    def moments(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if any(n == 0 for _, _, n in self.sums):
            raise BNStatsError("a BatchNorm layer saw no input: the images did not reach the taps")
        return [_mean_var(*acc) for acc in self.sums]

    def remove(self):
        for h in self.handles:
            h.remove()


def _run(model, batches) -> int:
    seen = 0
    for batch in batches:
        model.extractor(batch["image"].to(model.device))
        seen += len(batch["image"])
    if seen == 0:
        raise BNStatsError("no images to estimate the BatchNorm statistics from: add images to the split")
    return seen


@contextmanager
def recording_bn_moments(extractor):
    """Record the BatchNorm input moments of every forward pass of ``extractor`` inside the block (e.g. while
    a bank is fitted, so the reference moments cost no extra pass); ``.moments()`` on the yielded recorder."""
    hooks = _MomentHooks(extractor.bn_modules())
    try:
        yield hooks
    finally:
        hooks.remove()


@torch.no_grad()
def bn_input_moments(model, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, variance) of the input of every BatchNorm the taps depend on
    (``model.extractor.bn_modules()``, in order), over the images of ``batches``, in the current state (eval
    mode). On the clean training images these are the reference moments of :func:`match_bn_stats`."""
    model.extractor.eval()
    with recording_bn_moments(model.extractor) as recorder:
        _run(model, batches)
    return recorder.moments()


@torch.no_grad()
def reestimate_bn_stats(model, batches) -> int:
    """AdaBN: replace the running mean/variance of every BatchNorm the taps depend on by the moments of its
    input on the images of ``batches`` (an iterable of dicts with ``"image"``, e.g. a DataLoader): a cumulative
    average over all of them (``momentum=None``), affine parameters untouched. Returns the images seen."""
    extractor = model.extractor
    modules = extractor.bn_modules()
    saved = [bn.momentum for bn in modules]
    try:
        for bn in modules:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        return _run(model, batches)
    finally:
        for bn, m in zip(modules, saved):
            bn.momentum = m
        extractor.eval()


def referenced_stats(target, reference, state, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu', var')`` of the module docstring from the target moments ``(mu_t, var_t)``, the training
    moments ``(mu_r, var_r)`` and the reference running statistics ``(mu, var)``."""
    (mu_t, var_t), (mu_r, var_r), (mu, var) = target, reference, state
    mu_t, var_t, mu_r, var_r, mu, var = (v.double() for v in (mu_t, var_t, mu_r, var_r, mu, var))
    v_plus = (var_t * (var + eps) / var_r.clamp_min(1e-12)).clamp_min(eps)
    m = mu_t - v_plus.sqrt() * (mu_r - mu) / (var + eps).sqrt()
    return m, (v_plus - eps).clamp_min(0)


@torch.no_grad()
def match_bn_stats(model, batches, reference) -> int:
    """Training-referenced AdaBN (module docstring): set every BatchNorm's running statistics so that the
    images of ``batches`` are normalised to the moments that the training images have under the current
    (reference) state. ``reference`` is :func:`bn_input_moments` of the training images, taken in that same
    state. Returns the images seen."""
    extractor = model.extractor
    modules = extractor.bn_modules()
    if len(reference) != len(modules) or any(r[0].shape[0] != m.num_features for r, m in zip(reference, modules)):
        raise BNStatsError("the reference moments belong to another backbone: recompute them with "
                           "bn_input_moments on this backbone's training images")
    state = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in modules]

    def put(k, stats):
        modules[k].running_mean.copy_(stats[0])
        modules[k].running_var.copy_(stats[1])

    def on_batch(k, mean, var):  # normalise this batch as the whole split will be, layer by layer
        put(k, referenced_stats((mean, var), reference[k], state[k], modules[k].eps))

    extractor.eval()
    hooks = _MomentHooks(modules, on_batch)
    try:
        seen = _run(model, batches)
    except BaseException:
        for k, stats in enumerate(state):
            put(k, stats)
        raise
    finally:
        hooks.remove()
    for k, target in enumerate(hooks.moments()):
        put(k, referenced_stats(target, reference[k], state[k], modules[k].eps))
    return seen


@torch.no_grad()
def nearest_bank_distance(model, batches) -> float:
    """``d`` of the module docstring: the mean over every patch of ``batches`` (current state, eval mode) of its
    L2 distance to the nearest entry of ``model.bank``."""
    model.extractor.eval()
    total, count = 0.0, 0
    for batch in batches:
        feats = model.embed(batch["image"])
        feats = feats.reshape(-1, feats.shape[-1])
        d = pairwise_cost(feats, model.bank.to(feats)).min(1).values
        total, count = total + float(d.double().sum()), count + d.numel()
    if count == 0:
        raise BNStatsError("no images to measure the nearest-bank distance on: add images to the split")
    return total / count


@torch.no_grad()
def gate_bn_stats(model, batches, reference) -> dict:
    """``bn_init="gated"`` (module docstring): :func:`match_bn_stats`, kept only if it lowers the mean
    nearest-bank distance of ``batches`` (re-iterable, e.g. a DataLoader without shuffling); otherwise the
    running statistics are put back as they were. Returns ``{"bn_start": "matched" | "source",
    "nn_source": d(source), "nn_matched": d(matched)}``."""
    modules = model.extractor.bn_modules()
    state = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in modules]
    d_source = nearest_bank_distance(model, batches)
    match_bn_stats(model, batches, reference)
    d_matched = nearest_bank_distance(model, batches)
    keep = d_matched < d_source
    if not keep:
        for bn, (mean, var) in zip(modules, state):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return dict(bn_start="matched" if keep else "source", nn_source=d_source, nn_matched=d_matched)
