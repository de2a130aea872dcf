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

import difflib
import json
import os
import warnings
from pathlib import Path

from lib.common import registry
from lib.common.data import is_labelled_folder
from lib.common.utils import REPO_ROOT, ensure_writable, resolve_device, write_json
from lib.experiments.profile_table import (  # noqa: F401  (re-exported)
    _BASE,
    DECOMPOSITION_VARIANTS,
    PROFILES,
    RECOMMENDED,
    ROBUST_RODA,
    SLOW_LR,
    TABLE4,
    TABLE4_VARIANTS,
)
from lib.experiments.settings import (
    DERIVED_KEYS,
    FREE_DICTS,
    SPEC,
    Section,
    SettingsError,
    check_value,
    freeze,
    inferred_rule,
    thaw,
    unknown_key_message,
)
from lib.experiments.settings import merge_settings as _merge

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


#: where a run wrote, not what it computed: a clone elsewhere may differ here
WHERE = ("results_dir", "figures_dir", "cache_dir", "generated_root")


def recorded_path(path):
    """``path`` as config.json records it: relative to the repository when it lies inside the checkout or beside it
    (``results/real``, ``../shared/data``), as given otherwise (a folder named outside)."""
    if path is None or not Path(path).is_absolute():
        return None if path is None else Path(path).as_posix()
    for base, up in ((REPO_ROOT, []), (REPO_ROOT.parent, [".."])):
        if Path(path).is_relative_to(base):
            return "/".join(up + list(Path(path).relative_to(base).parts)) or "."
    return str(path)


def save_config(cfg: Profile) -> Path:
    """Write ``cfg`` to ``<results_dir>/config.json`` atomically (sorted keys: the same settings give the same
    bytes). The device is left out: it is where a run ran, not what it computed."""
    path = Path(cfg["results_dir"]) / "config.json"
    folders = (*WHERE, "data_root")  # relative to the repository: the same run gives the same bytes in any clone
    data = {k: recorded_path(v) if k in folders else v for k, v in cfg.to_dict().items() if k != "device"}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            old = {k: recorded_path(v) if k in folders else v for k, v in old.items()}
        except (OSError, ValueError, AttributeError, TypeError):
            old = None
        before = dict(_leaves(old)) if isinstance(old, dict) else {}
        now = dict(_leaves(json.loads(json.dumps(data, default=str))))
        changed = sorted(k for k in before.keys() | now.keys() if k not in WHERE and before.get(k) != now.get(k))
        if old is not None and changed:
            warnings.warn(f"{path} described other settings ({', '.join(changed[:6])}): tables already in "
                          f"{path.parent} may come from the old ones; rerun them or use another out_dir", stacklevel=3)
    return write_json(data, path)


def data_root_for(cfg: dict, task: str):
    """The data root a profile's task reads from: generated tasks read the profile's ``generated_root`` (never a
    user's data folder); MVTec tasks accept the MVTec root itself or a folder that holds ``mvtec/`` (as
    ``../shared/data`` does; :func:`lib.common.registry.task_root` decides); other tasks read the data root."""
    if task in ("synthetic", "synthetic_labelled"):
        return Path(cfg["generated_root"])
    root = cfg.get("data_root")
    if root is None:
        return None
    if task.startswith("mvtec/"):
        try:
            return registry.task_root(task, root)
        except registry.RegistryError:  # a category the registry does not know: the loader lists what is there
            nested = Path(root) / "mvtec"
            return nested if (nested / task.split("/", 1)[1]).is_dir() else Path(root)
    return Path(root)
