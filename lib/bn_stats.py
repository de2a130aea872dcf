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

Both estimators run the layers in order on the target batches, each layer normalising the batch with the
statistics that its own batch gives (as AdaBN's train-mode pass does), and keep the statistics of the whole
split (cumulative moments, every image once, no augmentation). No labels are read.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


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
