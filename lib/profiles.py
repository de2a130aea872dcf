"""Run profiles: one name in a notebook's parameters cell sets the size of everything it does.

=========  ===========================================================  ==========================
profile    data                                                         cost
=========  ===========================================================  ==========================
smoke      a generated 128 px MVTec-layout set with masks               seconds (the tests)
default    ELPV solar cells, shipped by the ``elpv-dataset`` package    minutes on 2 CPU cores
real       ``../shared/data`` (MVTec screw, KolektorSDD, HeadCT,         about 4 h on 2 CPU cores
           BrainMRI) or a user's MVTec AD root via ``data_root``         (04 alone 1.5 h)
full       all 15 MVTec AD categories, the papers' backbones            GPU-sized (hours)
=========  ===========================================================  ==========================

Every value can be overridden from the notebook (``get_profile(name, roda={"epochs": 3})``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from .data import SHARED_DATA
from .utils import REPO_ROOT, resolve_device

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
CORRUPTIONS = ("gaussian_noise", "defocus_blur", "brightness", "contrast")

_BASE = dict(
    backbone="mobilenet_v2",
    backbone_weights=None,
    compare_backbones=("mobilenet_v2", "efficientnet_lite0"),
    data_root=None,
    tasks=("elpv",),
    geometry=None,  # None: the dataset's own (lib.data.GEOMETRY); else dict(resize=..., crop=...)
    seeds=(0,),
    patchcore=dict(coreset_ratio=0.01, max_bank=None, max_train=None, max_test=None, batch_size=16),
    corruption=dict(names=CORRUPTIONS, severity=5, adapt_fraction=0.2),
    roda=dict(epochs=10, lr=0.003, momentum=0.9, batch_size=10, eps=0.05, rule="or", cost="l2",
              cost_norm="mean", bn_mode="eval", augment="flip_rot90", methods=("patchcore", "ttt++", "ttac", "roda"),
              # our named options, reported beside the paper's rule, never in its place
              variants={"roda_and": dict(method="roda", loss=dict(rule="and")),
                        # label-free robust configuration (docs/choices.md, RoDA section; notebook 08): eps from
                        # the first adaptation batch's plan spread, target marginal KL-relaxed, bank marginal by
                        # coverage, row pairs kept by plan mass, no remainder batch, stop when the batches'
                        # nearest-bank distance levels off
                        "roda_robust": dict(method="roda", drop_last=True, stop=dict(rel_tol=0.01, min_epochs=2),
                                            loss=dict(eps="auto", entries_per_row=8, ot="semi_relaxed", rho="auto",
                                                      rho_std=1.0, weights="coverage", rule="mass",
                                                      mass_fraction=0.5))}),
    # epochs: the RoDA/baseline epochs of notebook 04 (None: roda.epochs); table5_schedule: "epochs"
    # (every Table 5 row runs roda.epochs passes, so 80%/100% take 4-5x the steps) or "steps" (every
    # row takes the 20% row's number of steps: more data, same optimisation)
    ablation=dict(tasks=None, corruptions=None, seeds=(0, 1, 2), severities=(1, 2, 3, 4, 5), eps_grid=(0.01, 0.05, 0.1, 0.5),
                  epochs_grid=(1, 3, 10), lr_grid=(0.001, 0.01), choice_corruptions=CORRUPTIONS,
                  extra_corruptions=True, epochs=None, table5_schedule="epochs",
                  # notebook 08 (RoDA diagnosis): None = the profile's tasks / corruptions / seeds / every lead
                  diagnosis=dict(tasks=None, corruptions=None, seeds=None, leads=None, curve_corruptions=None,
                                 curve_epochs=None, bank_seed=0)),
    dpdl=dict(tasks=("elpv",), seeds=(0, 1, 2, 3, 4), n_anomalies=(10, 1), hard=False, image_size=224,
              epochs=10, iterations=20, batch_size=16, n_prototypes=32, eps=1e-3),
)

PROFILES = {
    "smoke": dict(
        tasks=("synthetic",),
        compare_backbones=("mobilenet_v2",),
        geometry=dict(resize=128, crop=112),
        patchcore=dict(coreset_ratio=0.05, max_bank=200, max_train=8, max_test=12, batch_size=8),
        corruption=dict(names=("gaussian_noise", "contrast")),
        roda=dict(epochs=1, batch_size=2),
        ablation=dict(seeds=(0, 1), corruptions=("gaussian_noise",), severities=(1, 5), eps_grid=(0.5,), epochs_grid=(2,), lr_grid=(),
                      choice_corruptions=("gaussian_noise",), extra_corruptions=False, table5_schedule="steps",
                      diagnosis=dict(corruptions=("gaussian_noise",), seeds=(0,), curve_corruptions=("gaussian_noise",),
                                     curve_epochs=2)),
        dpdl=dict(tasks=("synthetic_labelled",), seeds=(0, 1), n_anomalies=(2, 1), image_size=64, epochs=1,
                  iterations=2, batch_size=8, n_prototypes=4, ablation_seeds=(0,), sensitivity_seeds=(0,),
                  sensitivity=dict(n_prototypes=(2, 4), eps=(1e-3, 1e-2), kappa=(1.0, 10.0), lam=(0.01, 0.1))),
    ),
    "default": dict(
        tasks=("elpv",),
        patchcore=dict(coreset_ratio=0.01, max_bank=2000, max_train=120, max_test=150, batch_size=16),
        roda=dict(epochs=3),
        ablation=dict(seeds=(0, 1, 2), corruptions=("gaussian_noise", "brightness"), severities=(1, 3, 5),
                      eps_grid=(0.02, 0.2), epochs_grid=(1, 5), lr_grid=(0.001,),
                      choice_corruptions=("gaussian_noise",), extra_corruptions=True, table5_schedule="steps"),
        # the paper's 50 x 20 schedule (batch 48) is cut to 10 x 20 (batch 48) on a frozen backbone;
        # ELPV capped at 300 training normals and 400 test images so the cached maps take minutes
        dpdl=dict(tasks=("elpv",), seeds=(0, 1, 2, 3, 4), image_size=224, epochs=10, iterations=20, batch_size=48,
                  max_train=300, max_test=400, hard=False, ablation_seeds=(0, 1, 2), sensitivity_seeds=(0, 1, 2)),
    ),
    "real": dict(
        data_root=str(SHARED_DATA),
        tasks=("mvtec/screw", "ksdd"),
        patchcore=dict(coreset_ratio=0.01, max_bank=2500, max_train=None, max_test=None, batch_size=16),
        roda=dict(epochs=10),
        # sized for 2 CPU cores (about 1.5 h): 2 epochs (8 steps) per ablation run instead of notebook
        # 03's 10, Table 5 at equal steps, the open choices under noise only; every-corruption sweep on
        # the default profile only
        ablation=dict(seeds=(0, 1, 2), severities=(1, 2, 3, 4, 5), eps_grid=(0.02, 0.2), epochs_grid=(1, 10),
                      lr_grid=(0.001,), choice_corruptions=("gaussian_noise",), extra_corruptions=False, epochs=2,
                      table5_schedule="steps"),
        dpdl=dict(tasks=("mvtec/screw", "headct", "brainmri", "ksdd"), hard=True, seeds=(0, 1, 2, 3, 4),
                  hard_seeds=(0, 1, 2), image_size=224, epochs=10, iterations=20, batch_size=16),
    ),
    "full": dict(
        backbone="wide_resnet50_2",
        backbone_weights="IMAGENET1K_V1",
        compare_backbones=("wide_resnet50_2", "mobilenet_v2", "efficientnet_lite0"),
        tasks=tuple(f"mvtec/{c}" for c in MVTEC_CATEGORIES),
        patchcore=dict(coreset_ratio=0.1, max_bank=None, max_train=None, max_test=None, batch_size=32),
        roda=dict(epochs=10),
        ablation=dict(seeds=(0, 1, 2), severities=(1, 2, 3, 4, 5)),
        dpdl=dict(tasks=tuple(f"mvtec/{c}" for c in MVTEC_CATEGORIES), hard=True, image_size=448, epochs=50,
                  iterations=20),
    ),
}


OVERRIDES_ENV = "REPRO_PROFILE_OVERRIDES"


def parse_assignments(items) -> dict:
    """``["roda.epochs=5", "roda.variants={}"]`` -> nested dict; values are read as JSON when they parse."""
    out: dict = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE (e.g. roda.epochs=5), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def env_overrides() -> dict:
    """Overrides handed to notebook kernels by ``scripts/run_notebooks.py --set`` (a JSON dict)."""
    raw = os.environ.get(OVERRIDES_ENV)
    return json.loads(raw) if raw else {}


class Profile(dict):
    """A dict with attribute access (``cfg.roda["epochs"]`` or ``cfg.roda.epochs``)."""

    def __getattr__(self, key):
        try:
            value = self[key]
        except KeyError:
            raise AttributeError(key) from None
        return Profile(value) if isinstance(value, dict) and not isinstance(value, Profile) else value


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and v and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif v is not None:
            out[k] = copy.deepcopy(v)
    return out


def get_profile(name: str = "default", data_root=None, categories=None, device="auto", seed=None,
                out_dir=None, **overrides) -> Profile:
    """The profile ``name`` with the notebook parameters applied.

    ``categories`` replaces the RoDA/PatchCore tasks (``"screw"`` means ``"mvtec/screw"``); ``seed``
    replaces the seed list by one seed; ``out_dir`` (default: the repository) receives
    ``results/<profile>/`` and ``figures/<profile>/``.
    """
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {sorted(PROFILES)}")
    cfg = _merge(_merge(_merge(_BASE, PROFILES[name]), env_overrides()), overrides)
    cfg["name"] = name
    if data_root is not None:
        cfg["data_root"] = str(Path(data_root).expanduser())
    if categories:
        if isinstance(categories, str):
            categories = [c.strip() for c in categories.split(",") if c.strip()]
        known = {"elpv", "synthetic", "synthetic_labelled", "ksdd", "headct", "brainmri"}
        cfg["tasks"] = tuple(c if ("/" in c or c in known) else f"mvtec/{c}" for c in categories)
    if seed is not None:
        cfg["seeds"] = (int(seed),)
    cfg["device"] = str(resolve_device(device))
    out = Path(out_dir) if out_dir else REPO_ROOT
    cfg["results_dir"] = str(out / "results" / name)
    cfg["figures_dir"] = str(out / "figures" / name)
    cfg["cache_dir"] = str(out / "cache" / name)
    if name == "smoke" and cfg["data_root"] is None:
        cfg["data_root"] = str(out / "cache" / "data")
    for key in ("results_dir", "figures_dir", "cache_dir"):
        Path(cfg[key]).mkdir(parents=True, exist_ok=True)
    return Profile(cfg)


def task_root(cfg: dict, task: str):
    """The data root a task reads from: MVTec tasks accept either the MVTec root itself or a folder
    that holds ``mvtec/`` (as ``../shared/data`` does)."""
    root = cfg.get("data_root")
    if root is None:
        return None
    root = Path(root)
    if task.startswith("mvtec/") and (root / "mvtec" / task.split("/", 1)[1]).is_dir():
        return root / "mvtec"
    return root
