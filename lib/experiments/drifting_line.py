"""A simulated inspection line for notebook 07: a shift that ramps from clean to severity 5 and back,
and three ways to meet it, compared by AUROC per window.

The line is a list of windows; window ``w`` has a severity ``s_w`` (e.g. 0, 1, ..., 5, 5, ..., 0) and
``batches_per_window`` batches of ``batch_size`` test images, half normal and half anomalous, drawn
with replacement from the test set (seeded by ``(seed, w, b)``) and shifted by one corruption at
``s_w``. Strategies, all on the same batches and the same bank:

- ``none``: the source encoder throughout;
- ``one_shot``: RoDA-style offline adaptation on the line's first ``one_shot_batches`` batches
  (``one_shot_epochs`` passes), then frozen;
- ``stream``: :class:`lib.roda.online.StreamAdapter` with the label-free guard (prequential scoring);
- ``stream_unguarded``: the same loop adapting on every batch;
- ``stream_source_check`` (not in the default list; ``--set 'stream.strategies=[...]'``): the guarded
  stream that also compares the source state every ``source_check`` batches.

Labels and masks are read only to compute the per-window AUROC.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch

from lib.common.metrics import image_auroc, pixel_auroc
from lib.common.utils import progress, stable_hash
from lib.roda.adaptation import bn_state, restore_bn_state
from lib.roda.online import (
    GuardConfig,
    StreamAdapter,
    StreamConfig,
    batch_signals,
    default_loss_options,
    one_shot_adapt,
)


def line_settings(cfg) -> dict:
    """The line of the profile (its ``stream`` section, a plain dict); seeds ``None`` mean the profile's."""
    s = copy.deepcopy(dict(cfg["stream"]))
    s["guard"] = dict(s["guard"])
    s["seeds"] = tuple(cfg["seeds"]) if s["seeds"] is None else tuple(int(v) for v in s["seeds"])
    s["severities"] = tuple(int(v) for v in s["severities"])
    return s


def stream_config(cfg, settings: dict, seed: int, guarded: bool = True) -> StreamConfig:
    r = cfg["roda"]
    method = settings["method"]
    return StreamConfig(method=method, loss=default_loss_options(method, r), lr=r["lr"], momentum=r["momentum"],
                        steps_per_batch=settings["steps_per_batch"], augment=r["augment"], seed=seed,
                        guard=GuardConfig(**settings["guard"], enabled=guarded))


def make_line(task, settings: dict, seed: int, dataset_fn) -> list[dict]:
    """The batches of the line: dicts with ``window``, ``severity``, ``image``, ``mask``, ``label``."""
    test = list(task.test)
    normal = [s for s in test if s.label == 0]
    anomalous = [s for s in test if s.label == 1]
    if not normal or not anomalous:
        raise ValueError(f"{task.name}: the line needs normal and anomalous test images")
    half = settings["batch_size"] // 2
    batches = []
    for w, severity in enumerate(settings["severities"]):
        for b in range(settings["batches_per_window"]):
            rng = np.random.default_rng(stable_hash("line", seed, w, b))
            picked = [normal[i] for i in rng.integers(0, len(normal), settings["batch_size"] - half)]
            picked += [anomalous[i] for i in rng.integers(0, len(anomalous), half)]
            picked = [picked[i] for i in rng.permutation(len(picked))]
            ds = dataset_fn(task, picked, settings["corruption"], severity, seed + 1000 * w + b)
            items = [ds[i] for i in range(len(ds))]
            batches.append(dict(window=w, severity=severity, image=torch.stack([it["image"] for it in items]),
                                mask=torch.stack([it["mask"] for it in items]),
                                label=np.array([it["label"] for it in items])))
    return batches


def run_strategy(model, batches, strategy: str, cfg, settings: dict, seed: int):
    """Scores and maps of every batch under ``strategy``; the source state is restored afterwards.

    Returns (per-batch outputs, stream log rows)."""
    source = bn_state(model.extractor)
    outputs, log = [], []
    try:
        if strategy == "one_shot":
            first = [b["image"] for b in batches[: settings["one_shot_batches"]]]
            one_shot_adapt(model, first, stream_config(cfg, settings, seed), epochs=settings["one_shot_epochs"])
        stream = None
        if strategy.startswith("stream"):
            config = stream_config(cfg, settings, seed, guarded=strategy != "stream_unguarded")
            if strategy == "stream_source_check":
                config.guard.source_check = settings["source_check"]
            stream = StreamAdapter(model, config)
        for b in batches:
            if stream is not None:
                out = stream.process(b["image"])
                log.append(dict(out["row"], window=b["window"], severity=b["severity"]))
                patch = out["patch_scores"]
            else:
                patch = batch_signals(model, b["image"])["patch_scores"]
            outputs.append(dict(scores=patch.flatten(1).max(1).values.numpy(),
                                maps=model.anomaly_maps(patch, b["image"].shape[-2:])))
    finally:
        restore_bn_state(model.extractor, source)
    return outputs, log


def window_table(batches, outputs, strategy: str, seed: int) -> pd.DataFrame:
    """Image (and pixel, where masks exist) AUROC of each window."""
    rows = []
    for w in sorted({b["window"] for b in batches}):
        idx = [i for i, b in enumerate(batches) if b["window"] == w]
        labels = np.concatenate([batches[i]["label"] for i in idx])
        scores = np.concatenate([outputs[i]["scores"] for i in idx])
        masks = np.concatenate([batches[i]["mask"][:, 0].numpy() for i in idx]) > 0.5
        maps = np.concatenate([outputs[i]["maps"] for i in idx])
        rows.append(dict(strategy=strategy, seed=seed, window=w, severity=batches[idx[0]]["severity"],
                         n_images=len(labels), image_auroc=image_auroc(labels, scores),
                         pixel_auroc=pixel_auroc(masks, maps) if masks.any() else float("nan")))
    return pd.DataFrame(rows)


def compare(model, task, cfg, settings: dict, seed: int, dataset_fn, show_progress: bool = True):
    """Every strategy on one seeded line. Returns (per-window table, stream log)."""
    batches = make_line(task, settings, seed, dataset_fn)
    tables, logs = [], []
    for strategy in progress(settings["strategies"], desc=f"strategies seed {seed}", disable=not show_progress):
        outputs, log = run_strategy(model, batches, strategy, cfg, settings, seed)
        tables.append(window_table(batches, outputs, strategy, seed))
        logs += [dict(r, strategy=strategy, seed=seed) for r in log]
    return pd.concat(tables, ignore_index=True), pd.DataFrame(logs)
