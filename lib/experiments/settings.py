"""What every profile setting may hold: type, range and choices, checked before anything runs.

:data:`SPEC` maps a dotted key (``"roda.epochs"``) to a :class:`Rule`. :func:`check_config` checks a whole
merged configuration and raises one :class:`SettingsError` that lists every problem, argparse style::

    invalid settings for profile 'smoke':
      roda.epoch: unknown setting; did you mean roda.epochs?
      roda.epochs='abc': must be an integer >= 0, got 'abc' (str)

Keys that a profile holds but :data:`SPEC` does not list are checked against the type of their default
(:func:`inferred_rule`), so a new setting works as soon as it has a default in ``lib.experiments.profiles``.

The command line reads its options through the same rules: :func:`check_word` checks a typed word
(``roda fit --coreset-ratio -0.5``: "must be a number in (0, 1], got -0.5"), :data:`LOSS_OPTIONS` what each
loss option (``roda adapt --option eps=0.1``) may hold.

:class:`Section` is the read-only dict a resolved profile is built of (:func:`freeze` makes one, :func:`thaw` the
plain copy).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass


class SettingsError(ValueError):
    """An override or profile value that is unknown, of the wrong type or out of range."""


def _fmt(x) -> str:
    return repr(x) if isinstance(x, str) else str(x)


@dataclass(frozen=True)
class Rule:
    """One setting: ``kind`` is ``int``, ``float``, ``bool``, ``str``, ``seq`` (of ``item``), ``dict`` or ``geometry``.

    ``low``/``high`` bound numbers (``open_low``/``open_high``: strict); ``choices`` (or a callable giving
    them, for lists that live in other modules) restricts strings; ``nullable`` allows ``None``;
    ``nonempty`` refuses an empty sequence.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple | Callable | None = None
    nullable: bool = False
    item: Rule | None = None
    nonempty: bool = False

    def options(self):
        return tuple(self.choices()) if callable(self.choices) else self.choices

    def describe(self) -> str:
        if self.kind == "seq":
            text = ("a non-empty list of " if self.nonempty else "a list of ") + _plural(self.item.describe())
        elif self.kind == "geometry":
            text = "a dict(resize=INT or [H, W], crop=INT, [H, W] or null)"
        elif self.kind == "dict":
            text = "a dict"
        elif self.choices is not None:
            text = "one of " + ", ".join(_fmt(c) for c in self.options())
        else:
            text = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[self.kind]
            if self.low is not None and self.high is not None:
                left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
                text += f" in {left}{self.low:g}, {self.high:g}{right}"
            elif self.low is not None:
                text += f" {'>' if self.open_low else '>='} {self.low:g}"
        return ("null or " + text) if self.nullable else text

    def check(self, value):
        """``value`` normalised (lists become tuples, integers become floats where a number is expected);
        :class:`ValueError` with :meth:`describe` when it does not fit."""
        if value is None:
            if self.nullable:
                return None
            raise ValueError
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if self.kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError
            if self.kind == "int":
                if not float(value).is_integer():
                    raise ValueError
                value = int(value)
            else:
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError
            if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
                raise ValueError
            if self.high is not None and (value > self.high or (self.open_high and value == self.high)):
                raise ValueError
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise ValueError
            if self.choices is not None and value not in self.options():
                raise ValueError
            return value
        if self.kind == "seq":
            if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
                raise ValueError
            value = tuple(self.item.check(v) for v in value)
            if self.nonempty and not value:
                raise ValueError
            return value
        if self.kind == "dict":
            if not isinstance(value, dict):
                raise ValueError
            return value
        if self.kind == "geometry":
            if not isinstance(value, dict) or set(value) != {"resize", "crop"}:
                raise ValueError
            size = Rule("int", low=32)
            out = {}
            for key in ("resize", "crop"):
                v = value[key]
                if v is None and key == "crop":
                    out[key] = None
                elif isinstance(v, (list, tuple)) and len(v) == 2:
                    out[key] = tuple(size.check(x) for x in v)
                else:
                    out[key] = size.check(v)
            return out
        raise ValueError


def _plural(text: str) -> str:
    for a, b in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"),
                 ("one of", "items from"), ("true or false", "booleans")):
        if text.startswith(a):
            return b + text[len(a):]
    return text


def _corruptions():
    from lib.common.corruptions import all_corruption_names

    return all_corruption_names()


def _backbones():
    from lib.common.backbones import BACKBONES

    return sorted(BACKBONES)


def _methods():
    from lib.common.registry import methods

    return ("patchcore", *methods("alignment"))


def _from(module: str, name: str):
    """Choices that live in another module, read when first needed (those modules import torch)."""
    def options():
        import importlib

        return tuple(getattr(importlib.import_module(f"lib.{module}"), name))
    return options


def _int(low=None, **kw):
    return Rule("int", low=low, **kw)


def _num(low=None, high=None, **kw):
    return Rule("float", low=low, high=high, **kw)


def _seq(item, nonempty=True, **kw):
    return Rule("seq", item=item, nonempty=nonempty, **kw)


_SEED, _POS, _COUNT = _int(0), _num(0, open_low=True), _int(1)
_TASK = Rule("str")
_CORRUPTION = Rule("str", choices=_corruptions)

#: every known setting and what it may hold
SPEC: dict[str, Rule] = {
    "backbone": Rule("str", choices=_backbones),
    "backbone_weights": Rule("str", nullable=True),
    "compare_backbones": _seq(Rule("str", choices=_backbones)),
    "data_root": Rule("str", nullable=True),
    "tasks": _seq(_TASK),
    "geometry": Rule("geometry", nullable=True),
    "seeds": _seq(_SEED),
    "patchcore.coreset_ratio": _num(0, 1, open_low=True),
    "patchcore.max_bank": _int(1, nullable=True),
    "patchcore.max_train": _int(1, nullable=True),
    "patchcore.max_test": _int(2, nullable=True),
    "patchcore.batch_size": _COUNT,
    "corruption.names": _seq(_CORRUPTION),
    "corruption.severity": _int(0, high=5),
    # where the shift is applied: at the native resolution before the resize (the paper's protocol) or after it
    "corruption.stage": Rule("str", choices=_from("common.corruptions", "STAGES")),
    "corruption.adapt_fraction": _num(0, 1, open_low=True, open_high=True),
    "roda.epochs": _int(0),
    "roda.lr": _POS,
    "roda.momentum": _num(0, 1, open_high=True),
    "roda.batch_size": _COUNT,
    "roda.eps": _POS,
    "roda.rule": Rule("str", choices=_from("ot.transport", "RULES")),
    "roda.cost": Rule("str", choices=_from("ot.transport", "COST_KINDS")),
    "roda.cost_norm": Rule("str", choices=_from("ot.transport", "NORM_MODES")),
    "roda.bn_mode": Rule("str", choices=("eval", "train")),
    "roda.bn_init": Rule("str", choices=_from("roda.adaptation", "BN_INITS")),
    "roda.augment": Rule("str", choices=_from("roda.adaptation", "AUGMENTATIONS")),
    "roda.methods": _seq(Rule("str", choices=_methods)),
    "roda.variants": Rule("dict"),
    "ablation.tasks": _seq(_TASK, nullable=True),
    "ablation.corruptions": _seq(_CORRUPTION, nullable=True),
    "ablation.seeds": _seq(_SEED),
    "ablation.severities": _seq(_int(1, high=5)),
    "ablation.eps_grid": _seq(_POS, nonempty=False),
    "ablation.epochs_grid": _seq(_int(0), nonempty=False),
    "ablation.lr_grid": _seq(_POS, nonempty=False),
    "ablation.choice_corruptions": _seq(_CORRUPTION, nonempty=False),
    # notebook 08 (RoDA diagnosis): None = the profile's tasks / corruptions / seeds / every lead
    "ablation.diagnosis.tasks": _seq(_TASK, nullable=True),
    "ablation.diagnosis.corruptions": _seq(_CORRUPTION, nullable=True),
    "ablation.diagnosis.seeds": _seq(_SEED, nullable=True),
    "ablation.diagnosis.leads": _seq(Rule("str"), nullable=True),
    "ablation.diagnosis.curve_corruptions": _seq(_CORRUPTION, nullable=True),
    "ablation.diagnosis.curve_epochs": _int(1, nullable=True),
    "ablation.diagnosis.bank_seed": _int(0, nullable=True),
    # notebook 07's drifting line (lib.experiments.drifting_line); seeds None: the profile's
    "stream.seeds": _seq(_SEED, nullable=True),
    "stream.severities": _seq(_int(0, high=5)),
    "stream.corruption": _CORRUPTION,
    "ablation.extra_corruptions": Rule("bool"),
    "ablation.epochs": _int(1, nullable=True),
    "ablation.table5_schedule": Rule("str", choices=("epochs", "steps")),
    "ablation.workers": _int(1),
    "dpdl.tasks": _seq(_TASK),
    "dpdl.seeds": _seq(_SEED),
    "dpdl.n_anomalies": _seq(_COUNT),
    "dpdl.hard": Rule("bool"),
    "dpdl.image_size": _int(32),
    "dpdl.epochs": _COUNT,
    "dpdl.iterations": _COUNT,
    "dpdl.batch_size": _int(2),
    "dpdl.n_prototypes": _COUNT,
    "dpdl.eps": _POS,
    "dpdl.methods": _seq(Rule("str")),
    "dpdl.max_train": _int(1, nullable=True),
    "dpdl.max_test": _int(2, nullable=True),
    "dpdl.hard_seeds": _seq(_SEED, nullable=True),
    "dpdl.ablation_seeds": _seq(_SEED, nullable=True),
    "dpdl.sensitivity_seeds": _seq(_SEED, nullable=True),
    "dpdl.sensitivity": Rule("dict"),
    "dpdl.hard_n_anomalies": _seq(_COUNT, nullable=True),
    "dpdl.pseudo_variants": _int(0),
    "dpdl.rotation_variants": _int(0),
    "dpdl.dpdl_kwargs": Rule("dict"),
    "figures.qualitative_rows": _int(0),
}

#: keys get_profile sets itself (from its parameters), never from --set
DERIVED_KEYS = ("name", "device", "results_dir", "figures_dir", "cache_dir", "generated_root")


def inferred_rule(default) -> Rule:
    """The rule of a setting :data:`SPEC` does not list: the type of its default (``None``: anything)."""
    if isinstance(default, bool):
        return Rule("bool")
    if isinstance(default, int):
        return Rule("int")
    if isinstance(default, float):
        return Rule("float")
    if isinstance(default, str):
        return Rule("str")
    if isinstance(default, (list, tuple)):
        item = inferred_rule(default[0]) if default else None
        return Rule("seq", item=item or Rule("str"), nonempty=False) if item else Rule("any")
    if isinstance(default, dict):
        return Rule("dict")
    return Rule("any")


def check_value(key: str, value, rule: Rule):
    """``value`` checked and normalised under ``rule``; :class:`SettingsError` naming ``key`` otherwise."""
    if rule.kind == "any":
        return value
    try:
        return rule.check(value)
    except (ValueError, TypeError):
        shown = f"{value!r} ({type(value).__name__})"
        raise SettingsError(f"{key}={_fmt(value) if not isinstance(value, str) else repr(value)}: must be "
                            f"{rule.describe()}, got {shown}{_suggest(value, rule)}") from None


def _suggest(value, rule: Rule) -> str:
    """'; did you mean 'gaussian_noise'?' for a misspelt choice (alone or inside a list)."""
    if rule.kind == "seq" and isinstance(value, str):
        return f"; write a list as JSON, e.g. --set 'KEY=[{json.dumps(value)}]'"
    choice_rule = rule.item if rule.kind == "seq" and rule.item is not None else rule
    if choice_rule.choices is None:
        return ""
    options = [str(o) for o in choice_rule.options()]
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    hints = []
    for v in values:
        if isinstance(v, str) and v not in options:
            close = difflib.get_close_matches(v, options, n=1, cutoff=0.6)
            hints.append(f"{v!r} -> {close[0]!r}" if close else f"{v!r} is not one of them")
    return f"; did you mean: {', '.join(hints)}" if hints else ""


def unknown_key_message(key: str, known) -> str:
    """``'roda.epoch: unknown setting; did you mean roda.epochs?'``"""
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    if not close:  # compare the last part alone: 'patchcore.coreset' -> 'patchcore.coreset_ratio'
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in known if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], n=1, cutoff=0.75)][:3]
    if close:
        return f"{key}: unknown setting; did you mean {' or '.join(close)}?"
    sections = sorted({k.split(".", 1)[0] for k in known})
    return f"{key}: unknown setting; the known settings start with one of {', '.join(sections)}"


def parse_assignments(items) -> dict:
    """``["roda.epochs=5", "roda.variants={}"]`` -> nested dict; values are read as JSON when they parse
    (``5``, ``0.1``, ``true``, ``null``, ``[0, 1]``, ``{}``), else kept as text (``roda.rule=and``)."""
    out: dict = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set takes KEY=VALUE (e.g. roda.epochs=5), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SettingsError(f"--set {item!r}: {part} was already given a value, not a section")
        node[leaf] = value
    return out


# ------------------------------------------------------------------------------------------- command line


#: what a loss option (``roda adapt --option KEY=VALUE``, a variant's ``loss``) may hold, beyond the type of the
#: loss function's default; ``"auto"`` is also taken where :data:`LOSS_WORDS` says so
LOSS_OPTIONS: dict[str, Rule] = {
    "eps": SPEC["roda.eps"],
    "rule": SPEC["roda.rule"],
    "cost": SPEC["roda.cost"],
    "cost_norm": SPEC["roda.cost_norm"],
    "reduction": Rule("str", choices=("mean", "sum")),
    "mass_fraction": _num(0, 1, open_low=True),
    "entries_per_row": _num(1),
    "ot": Rule("str", choices=("absorb", "log", "semi_relaxed", "unbalanced")),
    "rho": _POS,
    "rho_std": _POS,
    "weights": Rule("str", choices=("uniform", "coverage")),
    "ridge": _POS,
    "mode": Rule("str", choices=("subsample", "tile")),
    "seed": _SEED,
    "mean_reduction": Rule("str", choices=("mean", "sum")),
    "direction": Rule("str", choices=("symmetric", "forward", "reverse")),
    "sinkhorn_kwargs": Rule("dict"),
}
#: loss options that also take a word: ``eps="auto"`` (calibrated on the first batch), ``rho="auto"``
LOSS_WORDS = {"eps": ("auto",), "rho": ("auto",)}


def read_word(text: str, rule: Rule):
    """A word typed on the command line as ``rule`` reads it: ``none`` / ``null`` -> None, numbers and
    ``true`` / ``false`` from their text (``1e-3``), JSON lists and dicts; a string setting keeps the text."""
    word = text.strip()
    if word.lower() in ("none", "null"):
        return None
    if rule.kind == "str":
        return text
    try:
        return json.loads(word)
    except json.JSONDecodeError:
        return word


def check_word(text: str, rule: Rule, words: tuple = ()):
    """``text`` (as typed by the user) read by :func:`read_word` and checked under ``rule``; a word of ``words`` is
    taken as it is. :class:`SettingsError` otherwise, showing what was typed::

        must be a number in (0, 1], got -0.5
        must be one of 'or', 'and', 'row', 'col', 'mass', got orr; did you mean: 'orr' -> 'or'
    """
    if text in words:
        return text
    value = read_word(text, rule)
    try:
        return rule.check(value)
    except (ValueError, TypeError):
        also = "".join(f" or {w!r}" for w in words)
        wanted = rule.describe().replace("null or ", "none or ", 1)
        raise SettingsError(f"must be {wanted}{also}, got {text}{_suggest(value, rule)}") from None


def thaw(value):
    """Plain dicts and lists (for JSON and for callers that want a mutable copy)."""
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def freeze(value):
    if isinstance(value, dict):
        return Section({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


class Section(dict):
    """A read-only dict with attribute access (``cfg.roda["epochs"]`` or ``cfg.roda.epochs``).

    Every mutation raises :class:`TypeError`: a changed copy comes from :meth:`Profile.replace`."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def _read_only(self, *args, **kwargs):
        raise TypeError("the profile is read-only: derive a variant with cfg.replace(roda={'epochs': 5}) "
                        "(or cfg.replace({'roda.epochs': 5})) and use the returned profile")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (type(self), (dict(self),))

    def to_dict(self) -> dict:
        return thaw(self)


#: a dict-valued setting that an override replaces as a whole (its keys are free, not settings)
FREE_DICTS = ("geometry", "roda.variants", "roda.method_defaults", "ablation.diagnosis.variants", "dpdl.sensitivity",
              "dpdl.dpdl_kwargs")


def merge_settings(base: dict, over: dict, prefix: str = "") -> dict:
    """``base`` with ``over`` applied: sections merge key by key, every other value (``None`` and the
    free dicts of :data:`FREE_DICTS` included) replaces the old one. Returns plain dicts."""
    out = thaw(base)
    for k, v in (over or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(out.get(k), dict) and key not in FREE_DICTS:
            out[k] = merge_settings(out[k], v, prefix=f"{key}.")
        else:
            out[k] = thaw(v)
    return out
