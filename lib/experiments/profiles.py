"""Run profiles: one name in a notebook's parameters cell sets the size of everything it does.

=========  ===========================================================  ==========================
profile    data                                                         cost
=========  ===========================================================  ==========================
smoke      a generated 128 px MVTec-layout set with masks               seconds (the tests)
default    ELPV solar cells, shipped by the ``elpv-dataset`` package    minutes on 2 CPU cores
real       ``../shared/data`` (MVTec bottle) or a user's MVTec AD root  about 2 h on 2 CPU cores
           via ``data_root``; the papers' schedules on one category
real_full  ``../shared/data`` (MVTec screw, bottle, tire, KSDD, HeadCT,  a night on 2 CPU cores (05
           BrainMRI, ELPV): every category, 3-5 seeds, every variant     at 50 x 20 ~4 h)
full       all 15 MVTec AD categories, the papers' backbones            GPU-sized (hours)
=========  ===========================================================  ==========================

Every value can be overridden from the notebook (``get_profile(name, roda={"epochs": 3})``) or from the
command line (``scripts/run_notebooks.py --set roda.epochs=3``). The profiles below are the only source of
defaults; :func:`get_profile` merges ``_BASE``, the profile, the ``--set`` overrides and the keyword
overrides, checks every key against the known settings (:data:`SPEC`: type, range, choices; unknown keys
are refused with the closest known ones), fills the values that default to another setting
(:data:`DERIVED`), and returns a read-only :class:`Profile`. Variants are derived, never edited in place::

    cfg = get_profile("default")
    fast = cfg.replace(roda={"epochs": 1})          # or cfg.replace({"roda.epochs": 1})

The resolved configuration is written to ``results/<profile>/config.json`` next to the tables it produced.
A dict-valued setting (``geometry``, ``roda.variants``, ``dpdl.sensitivity``) is replaced as a whole by an
override; ``null`` (``None``) is a value like any other (``--set patchcore.max_train=null``).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import warnings
from pathlib import Path

from lib.common import registry
from lib.common.data import SHARED_DATA, is_labelled_folder
from lib.common.registry import MVTEC_CATEGORIES
from lib.common.registry import PAPER_CORRUPTIONS as CORRUPTIONS
from lib.common.utils import REPO_ROOT, ensure_writable, resolve_device, write_json
from lib.experiments.settings import (
    DERIVED_KEYS,
    SPEC,
    Section,
    SettingsError,
    check_value,
    freeze,
    inferred_rule,
    thaw,
    unknown_key_message,
)

#: the label-free robust RoDA (``roda.variants["roda_robust"]``); docs/choices.md, RoDA section
ROBUST_RODA = dict(method="roda", drop_last=True, stop=dict(rel_tol=0.01, min_epochs=2),
                   loss=dict(eps="auto", entries_per_row=8, ot="semi_relaxed", rho="auto", rho_std=1.0,
                             weights="coverage", rule="mass", mass_fraction=0.5))

#: lr of the ``*_slow`` variants, a tenth of the paper's 0.003: at 0.003 the batches' mean nearest-bank distance rose
#: between epochs in 35 of 40 ``roda_robust_matched`` grid runs (the step overshoots); chosen from that unlabeled trace
SLOW_LR = 0.0003

#: the recommended label-free configuration: the variant of ``roda.variants`` that the rule of docs/recommendation.md
#: chose from the working-stage development grid (results/real_full/08_roda_grid.csv); the `roda adapt` default
RECOMMENDED = "roda_robust_matched_slow"

#: what each part of RoDA buys (lib.reporting.protocol_tables.DECOMPOSITION), one change at a time after
#: ``adabn_matched``: + continuous transport, + the Eq. 6 discretisation, + the paper's augmentation (run by
#: scripts/run_roda_grid.py beside the profile's variants; not part of the notebooks' tables)
DECOMPOSITION_VARIANTS = {"matched_ot_noaug": dict(method="continuous_ot", bn_init="matched", augment="none"),
                          "matched_roda_noaug": dict(method="roda", bn_init="matched", augment="none"),
                          "matched_roda": dict(method="roda", bn_init="matched")}

_BASE = dict(
    backbone="mobilenet_v2",
    backbone_weights=None,
    compare_backbones=("mobilenet_v2", "efficientnet_lite0"),
    data_root=None,
    tasks=("elpv",),
    geometry=None,  # None: the dataset's own (registry.TASKS[name].geometry); else dict(resize=..., crop=...)
    seeds=(0,),
    patchcore=dict(coreset_ratio=0.01, max_bank=None, max_train=None, max_test=None, batch_size=16),
    # stage: "native" corrupts at the originals' resolution before the resize (the paper's protocol, every paper
    # table), "working" after it (the harsher stress protocol); lib.common.corruptions explains both
    corruption=dict(names=CORRUPTIONS, severity=5, adapt_fraction=0.2, stage="native"),
    roda=dict(epochs=10, lr=0.003, momentum=0.9, batch_size=10, eps=0.05, rule="or", cost="l2",
              cost_norm="mean", bn_mode="eval", bn_init="source", augment="flip_rot90",
              methods=("patchcore", "ttt++", "ttac", "roda"),
              # our named options, reported beside the paper's rule, never in its place
              variants={"roda_and": dict(method="roda", loss=dict(rule="and")),
                        # AdaBN (not in the papers): BatchNorm statistics re-estimated on the unlabeled adaptation
                        # split, no alignment loss; and the literal RoDA started from those statistics
                        "adabn": dict(method="patchcore", bn_init="target"),
                        "roda_adabn": dict(method="roda", bn_init="target"),
                        # label-free robust configuration (docs/choices.md, RoDA section; notebook 08): eps from
                        # the first adaptation batch's plan spread, target marginal KL-relaxed, bank marginal by
                        # coverage, row pairs kept by plan mass, no remainder batch, stop when the batches'
                        # nearest-bank distance levels off
                        "roda_robust": copy.deepcopy(ROBUST_RODA),
                        # AdaBN referenced to the training images' statistics (lib.roda.bn_stats.match_bn_stats),
                        # alone and before the robust alignment
                        "adabn_matched": dict(method="patchcore", bn_init="matched"),
                        "roda_robust_matched": dict(copy.deepcopy(ROBUST_RODA), bn_init="matched"),
                        # the same at a tenth of the step (SLOW_LR) and the paper's fixed epochs (no stop rule): the
                        # recommended configuration (RECOMMENDED, docs/recommendation.md)
                        "roda_robust_matched_slow": dict(copy.deepcopy(ROBUST_RODA), bn_init="matched",
                                                         lr=SLOW_LR, stop=None),
                        # matched statistics only where they bring the split nearer the bank (bn_stats.gate_bn_stats)
                        "roda_robust_gated_slow": dict(copy.deepcopy(ROBUST_RODA), bn_init="gated", lr=SLOW_LR,
                                                       stop=None),
                        # the paper's RoDA (Eq. 5-6 as written) with the matched statistics and the small step
                        "roda_matched_slow": dict(method="roda", bn_init="matched", lr=SLOW_LR),
                        # and the small step alone (the paper's RoDA from the source statistics)
                        "roda_slow": dict(method="roda", lr=SLOW_LR)}),
    # epochs: the RoDA/baseline epochs of notebook 04 (None: roda.epochs); table5_schedule: "epochs"
    # (every Table 5 row runs roda.epochs passes, so 80%/100% take 4-5x the steps) or "steps" (every
    # row takes the 20% row's number of steps: more data, same optimisation)
    ablation=dict(tasks=None, corruptions=None, seeds=(0, 1, 2), severities=(1, 2, 3, 4, 5),
                  eps_grid=(0.01, 0.05, 0.1, 0.5), epochs_grid=(1, 3, 10), lr_grid=(0.001, 0.01),
                  choice_corruptions=CORRUPTIONS, extra_corruptions=True, epochs=None, table5_schedule="epochs",
                  workers=1,  # notebook 04's runs on this many local processes of one thread each (1: in the kernel)
                  # notebook 08 (RoDA diagnosis): None = the profile's tasks / corruptions / seeds / every lead
                  diagnosis=dict(tasks=None, corruptions=None, seeds=None, leads=None, curve_corruptions=None,
                                 curve_epochs=None, bank_seed=0)),
    # pseudo_variants / rotation_variants: the seeded augmentation pool per training normal (lib.dpdl.features);
    # dpdl_kwargs: further DPDLNet arguments (lib.dpdl.model documents each)
    dpdl=dict(tasks=("elpv",), seeds=(0, 1, 2, 3, 4), n_anomalies=(10, 1), hard=False, image_size=224,
              epochs=10, iterations=20, batch_size=16, n_prototypes=32, eps=1e-3, pseudo_variants=4,
              rotation_variants=2, dpdl_kwargs={},
              # the defaults notebook 05 carried (None: see DERIVED)
              methods=("dpdl", "devnet", "dra", "flos"), max_train=None, max_test=None, hard_seeds=None,
              hard_n_anomalies=None, ablation_seeds=None, sensitivity_seeds=None,
              sensitivity=dict(n_prototypes=(8, 16, 32, 64), eps=(1e-3, 1e-2, 1e-1, 1.0), kappa=(1.0, 5.0, 10.0, 20.0),
                               lam=(0.001, 0.01, 0.1, 1.0))),
    # notebook 06: rows of the qualitative map figure (one RoDA adaptation per row)
    figures=dict(qualitative_rows=4),
)

#: a dict-valued setting that an override replaces as a whole (its keys are free, not settings)
FREE_DICTS = ("geometry", "roda.variants", "dpdl.sensitivity", "dpdl.dpdl_kwargs")


def _merge(base: dict, over: dict, prefix: str = "") -> dict:
    """``base`` with ``over`` applied: sections merge key by key, every other value (``None`` and the
    free dicts of :data:`FREE_DICTS` included) replaces the old one. Returns plain dicts."""
    out = thaw(base)
    for k, v in (over or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(out.get(k), dict) and key not in FREE_DICTS:
            out[k] = _merge(out[k], v, prefix=f"{key}.")
        else:
            out[k] = thaw(v)
    return out


# ELPV at the scale the default profile had up to v0.4 (hours on 2 cores: its v0.4 renders took 41 min for
# notebook 04 and 31 min for 05): 3 seeds for the RoDA ablations, 5 for DPDL, every named RoDA variant;
# its tables are the ELPV tables the README discusses
_ELPV = dict(
    tasks=("elpv",),
    # the ELPV cells are stored at their native 300 px, so the stages differ by the 300 -> 256 resize only; the
    # default and elpv tables (and the smoke golden tables) were measured after the resize
    corruption=dict(stage="working"),
    patchcore=dict(coreset_ratio=0.01, max_bank=2000, max_train=120, max_test=150, batch_size=16),
    roda=dict(epochs=3),
    figures=dict(qualitative_rows=2),
    # notebook 08 on ELPV illustrates the diagnosis (one seed, two corruptions: about a quarter of an
    # hour); the per-lead grid with 3 seeds and 4 corruptions belongs to the real profile
    ablation=dict(seeds=(0, 1, 2), corruptions=("gaussian_noise", "brightness"), severities=(1, 3, 5),
                  eps_grid=(0.02, 0.2), epochs_grid=(1, 5), lr_grid=(0.001,),
                  choice_corruptions=("gaussian_noise",), extra_corruptions=True, table5_schedule="steps",
                  diagnosis=dict(corruptions=("gaussian_noise", "brightness"), seeds=(0,),
                                 curve_corruptions=("gaussian_noise",))),
    # the paper's 50 x 20 schedule (batch 48) is cut to 10 x 20 (batch 48) on a frozen backbone;
    # ELPV capped at 300 training normals and 400 test images so the cached maps take minutes; the hard
    # setting (mono / poly) runs at M = 10 with 3 seeds (the real profile: 5), the ablations with 3 seeds
    dpdl=dict(tasks=("elpv",), seeds=(0, 1, 2, 3, 4), image_size=224, epochs=10, iterations=20, batch_size=48,
              max_train=300, max_test=400, hard=True, hard_n_anomalies=(10,), hard_seeds=(0, 1, 2),
              ablation_seeds=(0, 1, 2), sensitivity_seeds=(0, 1),
              sensitivity=dict(dpl_weight=(0.1, 1.0), dpl_margin=(0.3, 3.0))),
)


# every real category, 3-5 seeds and every named variant: a night on 2 cores (named `real` up to v0.9; its tables
# are results/real_full/, most of them from the resumable scripts)
_REAL_FULL = dict(
    data_root=str(SHARED_DATA),
    tasks=("mvtec/screw", "mvtec/bottle", "mvtec/tire", "ksdd"),
    patchcore=dict(coreset_ratio=0.01, max_bank=2500, max_train=None, max_test=None, batch_size=16),
    roda=dict(epochs=10),
    # notebook 04 at the paper's 10 epochs (ablation.epochs None: roda.epochs) on MVTec screw, 3 seeds, its
    # runs on both cores; Table 5 at equal steps, open choices under noise only, every corruption: default only
    ablation=dict(seeds=(0, 1, 2), severities=(1, 2, 3, 4, 5), eps_grid=(0.02, 0.2), epochs_grid=(1, 10),
                  lr_grid=(0.001,), choice_corruptions=("gaussian_noise",), extra_corruptions=False,
                  table5_schedule="steps", workers=2),
    dpdl=dict(tasks=("mvtec/screw", "headct", "brainmri", "ksdd_thirds", "elpv"), hard=True, seeds=(0, 1, 2, 3, 4),
              hard_seeds=(0, 1, 2, 3, 4), image_size=224, epochs=50, iterations=20, batch_size=16),
)


PROFILES = {
    "smoke": dict(
        tasks=("synthetic",),
        compare_backbones=("mobilenet_v2",),
        geometry=dict(resize=128, crop=112),
        patchcore=dict(coreset_ratio=0.05, max_bank=200, max_train=8, max_test=12, batch_size=8),
        corruption=dict(names=("gaussian_noise", "contrast"), stage="working"),
        # batch 2: the smoke adaptation split (2-3 images) must hold one full batch (drop_last)
        roda=dict(epochs=1, batch_size=2),
        figures=dict(qualitative_rows=2),
        ablation=dict(seeds=(0, 1), corruptions=("gaussian_noise",), severities=(1, 5), eps_grid=(0.5,),
                      epochs_grid=(2,), lr_grid=(), choice_corruptions=("gaussian_noise",), extra_corruptions=False,
                      table5_schedule="steps",
                      diagnosis=dict(corruptions=("gaussian_noise",), seeds=(0,), curve_corruptions=("gaussian_noise",),
                                     curve_epochs=2)),
        dpdl=dict(tasks=("synthetic_labelled",), seeds=(0, 1), n_anomalies=(2, 1), image_size=64, epochs=1,
                  iterations=2, batch_size=8, n_prototypes=4, ablation_seeds=(0,), sensitivity_seeds=(0,),
                  pseudo_variants=1, rotation_variants=1,
                  sensitivity=dict(n_prototypes=(2, 4), eps=(1e-3, 1e-2), kappa=(1.0, 10.0), lam=(0.01, 0.1))),
    ),
    # the main job (`make run`): every notebook on ELPV in under 20 minutes on 2 CPU cores: sizes of 01/02/07 as
    # in `elpv`, RoDA 2 epochs, three of the named variants, one seed for the grids, DPDL 2 seeds at 5 x 20
    "default": _merge(_ELPV, dict(
        roda=dict(epochs=2, variants={k: _BASE["roda"]["variants"][k]
                                      for k in ("adabn_matched", "roda_robust", "roda_robust_matched")}),
        ablation=dict(seeds=(0,), severities=(1, 5), epochs_grid=(1, 3), lr_grid=(), extra_corruptions=False,
                      diagnosis=dict(corruptions=("gaussian_noise",), curve_epochs=3)),
        dpdl=dict(seeds=(0, 1), epochs=5, hard_seeds=(0,), ablation_seeds=(0,), sensitivity_seeds=(0,)))),
    "elpv": _ELPV,
    # the papers' schedules on real data in about 2 hours on 2 CPU cores (issue 9): `real_full` on one MVTec category
    # (bottle, the smallest), five of the named variants, DPDL with 3 seeds, notebook 08 on two corruptions
    "real": _merge(_REAL_FULL, dict(
        tasks=("mvtec/bottle",),
        roda=dict(variants={k: _BASE["roda"]["variants"][k] for k in
                            ("adabn_matched", "roda_slow", "roda_robust", "roda_robust_matched_slow",
                             "roda_robust_gated_slow")}),
        ablation=dict(diagnosis=dict(corruptions=("gaussian_noise", "brightness"), seeds=(0,),
                                     curve_corruptions=("gaussian_noise",))),
        dpdl=dict(tasks=("mvtec/bottle",), seeds=(0, 1, 2), hard_n_anomalies=(10,), hard_seeds=(0,),
                  ablation_seeds=(0, 1, 2), sensitivity_seeds=(0,)))),
    "real_full": _REAL_FULL,
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


#: settings whose ``None`` means "the value of another setting" (filled in by :func:`get_profile`)
DERIVED = {
    "ablation.tasks": lambda c: tuple(c["tasks"][:1]),
    "ablation.corruptions": lambda c: tuple(c["corruption"]["names"]),
    "ablation.epochs": lambda c: c["roda"]["epochs"],
    "dpdl.hard_seeds": lambda c: tuple(c["dpdl"]["seeds"]),
    "dpdl.hard_n_anomalies": lambda c: tuple(c["dpdl"]["n_anomalies"]),
    "dpdl.ablation_seeds": lambda c: tuple(c["dpdl"]["seeds"]),
    "dpdl.sensitivity_seeds": lambda c: tuple(c["dpdl"]["seeds"][:3]),
}


def env_overrides() -> dict:
    """Overrides handed to notebook kernels by ``scripts/run_notebooks.py --set`` (a JSON dict)."""
    raw = os.environ.get(OVERRIDES_ENV)
    return json.loads(raw) if raw else {}


class Profile(Section):
    """The resolved configuration of a run (read-only; :meth:`replace` derives a variant)."""

    def __reduce__(self):
        return (_rebuild, (dict(self), getattr(self, "_raw", None)))

    def replace(self, changes: dict | None = None, **overrides) -> Profile:
        """A new profile with ``overrides`` merged in and checked like ``get_profile``'s
        (``cfg.replace(roda={"epochs": 1})``; dotted keys in ``changes``: ``cfg.replace({"roda.epochs": 1})``).
        Settings that default to another one (:data:`DERIVED`) follow the new values."""
        over = _merge(_undot(changes or {}), overrides)
        raw = getattr(self, "_raw", None) or self.to_dict()
        check_override_keys(over, f"profile {self.get('name')!r}")
        cfg = _merge(raw, over)
        return _finish(cfg, {k: self[k] for k in DERIVED_KEYS if k in self})

    with_overrides = replace


def _rebuild(data, raw):
    cfg = Profile(data)
    object.__setattr__(cfg, "_raw", raw)
    return cfg


def _undot(changes: dict) -> dict:
    out: dict = {}
    for key, value in changes.items():
        node = out
        *parents, leaf = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in FREE_DICTS:
            yield from _leaves(v, f"{key}.")
        else:
            yield key, v


def known_settings() -> dict:
    """Every settable key -> its rule: the keys of ``_BASE`` and of every profile (:data:`SPEC`, else the
    type of the first non-``None`` default)."""
    known: dict = {}
    for source in (_BASE, *PROFILES.values()):
        for key, value in _leaves(source):
            if key not in known or (known[key].kind == "any" and value is not None):
                known[key] = SPEC.get(key) or inferred_rule(value)
    return known


def _sections() -> set:
    return {k.rsplit(".", 1)[0] for k in known_settings() if "." in k}


def check_override_keys(overrides: dict, where: str = "the overrides") -> None:
    """Refuse unknown keys (with the closest known ones) and values that replace a section."""
    known, sections, problems = known_settings(), _sections(), []
    for key, value in _leaves(overrides):
        if key in known:
            continue
        if key in DERIVED_KEYS:
            problems.append(f"{key}: set by get_profile itself (use its parameters: data_root, device, seed, "
                            "out_dir; or --data-root, --device, --seed, --out-dir)")
        elif key in sections:
            problems.append(f"{key}={value!r}: {key} is a section, not a value: set its keys, e.g. "
                            f"{next(k for k in known if k.startswith(key + '.'))}=...")
        elif any(key.startswith(s + ".") for s in FREE_DICTS):
            continue  # inside a free dict: checked as a whole
        else:
            problems.append(unknown_key_message(key, known))
    if problems:
        raise SettingsError(f"invalid settings in {where}:\n  " + "\n  ".join(problems))


def check_config(cfg: dict, where: str) -> dict:
    """Every value of a merged configuration checked (and normalised) against its rule."""
    known, problems, out = known_settings(), [], thaw(cfg)
    for key, value in list(_leaves(cfg)):
        if key in DERIVED_KEYS or key not in known:
            continue
        try:
            value = check_value(key, value, known[key])
        except SettingsError as err:
            problems.append(str(err))
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    missing = [k for k in SPEC if k not in dict(_leaves(cfg))]
    problems += [f"{k}: missing (every setting needs a default in lib.experiments.profiles._BASE)" for k in missing]
    if problems:
        raise SettingsError(f"invalid settings for {where}:\n  " + "\n  ".join(problems))
    return out


def _fill_derived(cfg: dict) -> dict:
    for key, rule in DERIVED.items():
        section, leaf = key.split(".")
        if cfg[section].get(leaf) is None:
            cfg[section][leaf] = rule(cfg)
    return cfg


def _finish(raw: dict, derived: dict) -> Profile:
    """Check ``raw`` (the merged settings), fill :data:`DERIVED`, add the get_profile keys, freeze."""
    checked = check_config(raw, f"profile {derived.get('name')!r}")
    cfg = freeze({**_fill_derived(thaw(checked)), **derived})
    cfg = Profile(cfg)
    object.__setattr__(cfg, "_raw", checked)
    return cfg


def _task_name(category: str, data_root) -> str:
    """``"screw"`` -> ``"mvtec/screw"``; a labelled folder (one with ``labels.csv``, by path or under
    ``data_root``) and the built-in names stay as they are."""
    if category in registry.TASKS or category.startswith("mvtec/"):
        return category
    if is_labelled_folder(Path(category).expanduser()):
        return str(Path(category).expanduser().resolve())
    if data_root is not None and is_labelled_folder(Path(data_root).expanduser() / category):
        return category
    return f"mvtec/{category}"


def resolve(name: str = "default", data_root=None, categories=None, device="auto", seed=None, out_dir=None,
            **overrides) -> Profile:
    """The resolved configuration, without touching the disk (see :func:`get_profile`)."""
    if name not in PROFILES:
        close = difflib.get_close_matches(str(name), list(PROFILES), n=1)
        raise SettingsError(f"unknown profile {name!r}: choose one of {sorted(PROFILES)}"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
    env = env_overrides()
    check_override_keys(env, f"--set (the {OVERRIDES_ENV} environment variable)")
    check_override_keys(overrides, "get_profile's keyword overrides")
    cfg = _merge(_merge(_merge(_BASE, PROFILES[name]), env), overrides)
    if data_root is not None:
        cfg["data_root"] = str(Path(data_root).expanduser())
    if categories:
        if isinstance(categories, str):
            categories = [c.strip() for c in categories.split(",") if c.strip()]
        cfg["tasks"] = tuple(_task_name(c, cfg["data_root"]) for c in categories)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) and not str(seed).strip().isdigit():
            raise SettingsError(f"seed={seed!r}: must be an integer >= 0")
        cfg["seeds"] = (int(seed),)
    out = Path(out_dir).expanduser() if out_dir else REPO_ROOT
    derived = dict(name=name, device=str(resolve_device(device)), results_dir=str(out / "results" / name),
                   figures_dir=str(out / "figures" / name), cache_dir=str(out / "cache" / name),
                   # generated sets (synthetic tasks) live here, never in a user's data_root
                   generated_root=str(out / "cache" / "data"))
    return _finish(cfg, derived)


def get_profile(name: str = "default", data_root=None, categories=None, device="auto", seed=None,
                out_dir=None, **overrides) -> Profile:
    """The profile ``name`` with the notebook parameters applied, checked, and saved.

    ``categories`` replaces the RoDA/PatchCore tasks (``"screw"`` means ``"mvtec/screw"``; a folder with
    ``labels.csv``, by path or under ``data_root``, is a labelled task); ``seed`` replaces the seed list by
    one seed; ``out_dir`` (default: the repository) receives ``results/<profile>/`` and
    ``figures/<profile>/``; keyword ``overrides`` are sections to merge (``roda={"epochs": 3}``).

    Raises :class:`SettingsError` for unknown keys or bad values, and :class:`lib.common.utils.OutputError` when an
    output folder cannot be written. Writes the resolved configuration to ``results/<profile>/config.json``
    (warning when it replaces a different one: the folder then mixes tables of two configurations).
    """
    cfg = resolve(name, data_root, categories, device, seed, out_dir, **overrides)
    for key, what in (("results_dir", "results folder"), ("figures_dir", "figures folder"),
                      ("cache_dir", "cache folder")):
        ensure_writable(cfg[key], what)
    save_config(cfg)
    return cfg


#: where a run wrote (absolute paths of the checkout it ran in), not what it computed: a clone elsewhere differs here
WHERE = ("results_dir", "figures_dir", "cache_dir", "generated_root")


def save_config(cfg: Profile) -> Path:
    """Write ``cfg`` to ``<results_dir>/config.json`` atomically (sorted keys: the same settings give the same
    bytes). The device is left out: it is where a run ran, not what it computed."""
    path = Path(cfg["results_dir"]) / "config.json"
    data = {k: v for k, v in cfg.to_dict().items() if k != "device"}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        before = dict(_leaves(old)) if isinstance(old, dict) else {}
        now = dict(_leaves(json.loads(json.dumps(data, default=str))))
        changed = sorted(k for k in before.keys() | now.keys() if k not in WHERE and before.get(k) != now.get(k))
        if old is not None and changed:
            warnings.warn(f"{path} described other settings ({', '.join(changed[:6])}): tables already in "
                          f"{path.parent} may come from the old ones; rerun them or use another out_dir", stacklevel=3)
    return write_json(data, path)


def task_root(cfg: dict, task: str):
    """The data root a task reads from: generated tasks read the profile's ``generated_root`` (never a
    user's data folder); MVTec tasks accept either the MVTec root itself or a folder that holds ``mvtec/``
    (as ``../shared/data`` does)."""
    if task in ("synthetic", "synthetic_labelled"):
        return Path(cfg["generated_root"])
    root = cfg.get("data_root")
    if root is None:
        return None
    root = Path(root)
    if task.startswith("mvtec/") and (root / "mvtec" / task.split("/", 1)[1]).is_dir():
        return root / "mvtec"
    return root
