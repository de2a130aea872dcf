"""What the ``roda`` command accepts, checked before any compute starts.

- :func:`existing`, :func:`readable`: the paths and images given, checked (an unreadable image stops the run or is
  skipped, ``--on-error``); :class:`CliError` reports one line and exits with its code.
- :func:`check_state_bank`: a ``--state`` adapted against another bank (:func:`bank_fingerprint`), refused before
  any model loads unless ``--force``.
- :func:`setting`: an argparse ``type`` that reads an option through a :class:`lib.experiments.settings.Rule`, the
  profiles' rule where the option is a profile setting (``--coreset-ratio`` is ``patchcore.coreset_ratio``), so a
  value the runner's ``--set`` refuses is refused here too, with the value the user typed.
- :func:`loss_options`: ``--option KEY=VALUE`` by name (the loss function's arguments) and type
  (:data:`lib.experiments.settings.LOSS_OPTIONS`, else the type of the argument's default).
- :func:`check_eps`: a degenerate ``eps`` caught from the first batch's cost scale, before Sinkhorn iterates.
- :func:`check_output`: every output location proven writable before the compute, naming the option.
- :func:`staged_folder`: a folder of outputs (``roda score -o``) written beside its target and moved into place
  whole at the end, or removed when the run stops: an interrupted run leaves nothing.
- :class:`HelpFormatter`: each option's default shown once, none for required options; :func:`quiet_library`:
  ``--quiet`` reaches the progress bars inside PatchCore.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lib.experiments.settings import (
    LOSS_OPTIONS,
    LOSS_WORDS,
    SPEC,
    Rule,
    SettingsError,
    check_word,
    inferred_rule,
    read_word,
)

#: a plan whose costs spread over more than this many ``eps`` (in cost units) is degenerate: Sinkhorn needs about
#: 8 iterations per unit of ``spread / eps`` (measured on the test set's MobileNetV2 features: 150 iterations at
#: 21, 860 at 104), so past 1e4 its 1000 iterations fall short by two orders of magnitude and every step would
#: run them all for a plan that is not Eq. 5's
MAX_SPREAD_OVER_EPS = 1e4

#: loss arguments that are no user option: the features, the bank and what the command fills in itself
NOT_OPTIONS = ("target", "bank", "bank_weights", "anomalous_rows", "return_plan", "return_pairs", "stats")

IMAGE_SIZE = Rule("int", low=32)  # a side after resizing / cropping (the geometry rule of the profiles)
#: options that are no profile setting: a seed (as the profiles' seeds), a number of steps, a score threshold
SEED, STEPS, NUMBER = SPEC["seeds"].item, Rule("int", low=1), Rule("float")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """An error to report in one line and exit with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


class OptionError(SettingsError):
    """A command-line option that is unknown, ill-typed or out of range; the message shows what was typed."""


class HelpFormatter(argparse.HelpFormatter):
    """``(default: X)`` appended once, unless the help already speaks of the default; nothing for required
    options, positionals, flags and options whose default is None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.required or not action.option_strings
                or any(action.default is v for v in (None, False, argparse.SUPPRESS))):  # 0 is a default to show
            return text
        return f"{text} (default: %(default)s)"


def setting(rule: str | Rule, zero_is_none: bool = False):
    """argparse ``type`` of an option: the text read and checked under ``rule`` (a key of
    :data:`lib.experiments.settings.SPEC` or a :class:`Rule`); ``zero_is_none``: ``0`` means none (``--max-bank``)."""
    rule = SPEC[rule] if isinstance(rule, str) else rule

    def read(text: str):
        try:
            return check_word("none" if zero_is_none and text.strip() == "0" else text, rule)
        except SettingsError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    read.__name__ = getattr(rule, "kind", "value")
    return read


def size(text: str):
    """``256`` -> 256 (shorter side / square crop); ``320x240`` -> [320, 240] as (h, w); ``none`` -> None; every side
    at least 32 px, as a profile's geometry."""
    if text.strip().lower() == "none":
        return None
    try:
        sides = [check_word(v, IMAGE_SIZE) for v in text.lower().split("x")]
    except SettingsError as err:
        raise argparse.ArgumentTypeError(f"expected a size like 256, 320x240 or none: {err}") from None
    if len(sides) > 2:
        raise argparse.ArgumentTypeError(f"expected a size like 256, 320x240 or none, got {text}")
    return sides if len(sides) == 2 else sides[0]


# ------------------------------------------------------------------------------------------------- inputs


def existing(path: str, kind: str) -> Path:
    """``path`` as a Path when it is an existing ``kind`` (``"folder"``, else a file); a usage error otherwise."""
    p = Path(path).expanduser()
    ok = p.is_dir() if kind == "folder" else p.is_file()
    if not ok:
        raise CliError(f"{kind} {p} does not exist" + (" (or is not a folder)" if kind == "folder" else ""),
                       EXIT_USAGE)
    return p


def readable(items, args, what: str) -> list:
    """Check every image once; stop on the first unreadable ones or skip them (``--on-error``)."""
    from lib.common.folders import scan

    if not items:
        raise CliError(f"no images (png, jpg, bmp, tif) found in {what} (searched recursively)")
    good, bad = scan(items, show_progress=not args.quiet)
    for path, reason in bad:
        print(f"{'skipped' if args.on_error == 'skip' else 'unreadable'}: {path}: {reason}", file=sys.stderr)
    if bad and args.on_error == "stop":
        raise CliError(f"{len(bad)} of {len(items)} images in {what} cannot be read (listed above): fix or remove "
                       "them, or pass --on-error skip to leave them out")
    if not good:
        raise CliError(f"none of the {len(items)} images in {what} can be read")
    return good


def bank_fingerprint(model) -> str:
    """Shape and sums of the bank of ``model`` (or of a bank tensor): what a state file records of its bank."""
    from lib.common.utils import stable_hash

    bank = getattr(model, "bank", model).detach().cpu().float()
    return f"{tuple(bank.shape)}:{stable_hash(float(bank.sum()), float(bank.abs().sum()), float(bank[0].sum()))}"


def check_state_bank(bank: str, state: str | None, force: bool) -> None:
    """Before any model loads: a ``--state`` adapted against another bank is refused, unless ``--force``."""
    if state is None:
        return
    import torch

    try:
        info = torch.load(state, map_location="cpu", weights_only=False).get("info") or {}
        ours = bank_fingerprint(torch.load(bank, map_location="cpu", weights_only=False)["bank"])
    except Exception:  # noqa: BLE001 - an unreadable bank or state is reported where it is loaded
        return
    if info.get("bank") and info["bank"] != ours:
        if not force:
            raise CliError(f"{state} was adapted against another bank ({info.get('bank_file', 'unknown')}): adapt "
                           "again with this bank, or pass --force to score with it anyway")
        print(f"warning: {state} was adapted against another bank (--force)", file=sys.stderr)


# ------------------------------------------------------------------------------------------- loss options


def option_rules(method: str) -> dict:
    """``name -> (rule, words)`` of every option the loss of ``method`` takes (``roda`` also takes the robust
    variant's data-driven options)."""
    from lib.roda.adaptation import DATA_DRIVEN_KEYS
    from lib.roda.alignment import ALIGNMENT_LOSSES

    params = inspect.signature(ALIGNMENT_LOSSES[method]).parameters
    names = [p for p in params if p not in NOT_OPTIONS] + (list(DATA_DRIVEN_KEYS) if method == "roda" else [])
    rules = {}
    for name in names:
        default = params[name].default if name in params else None
        rule = LOSS_OPTIONS.get(name) or inferred_rule(None if default is inspect.Parameter.empty else default)
        rules[name] = (rule, LOSS_WORDS.get(name, ()))
    return rules


def loss_options(method: str, pairs) -> dict:
    """``["eps=0.1", "rule=and"]`` -> ``{"eps": 0.1, "rule": "and"}``, each name known to ``method``'s loss and each
    value of its type; :class:`OptionError` showing the typed text otherwise."""
    rules, out, problems = option_rules(method), {}, []
    for pair in pairs or ():
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            problems.append(f"--option takes KEY=VALUE (e.g. eps=0.1), got {pair!r}")
        elif name not in rules:
            close = difflib.get_close_matches(name, list(rules), n=1)
            problems.append(f"--option {pair}: {method} takes no option {name!r}"
                            + (f"; did you mean {close[0]}?" if close else "")
                            + f" (its options: {', '.join(sorted(rules)) or 'none'})")
        else:
            rule, words = rules[name]
            try:
                out[name] = read_word(text, rule) if rule.kind == "any" else check_word(text, rule, words)
            except SettingsError as err:
                problems.append(f"--option {pair}: {name} {err}")
    if problems:
        raise OptionError("; ".join(problems))
    return out


def check_eps(model, images, options: dict, typed: dict) -> None:
    """Refuse a numeric ``eps`` whose plan would be degenerate on ``images`` (the folder's first ones): the spread of
    their costs (``max_ij (C_ij - min_j C_ij)``) over ``eps`` in cost units (``eps`` times the ``cost_norm`` scale)
    above :data:`MAX_SPREAD_OVER_EPS`. ``typed`` holds the ``--option`` values as the user gave them."""
    import torch

    from lib.ot.transport import cost_scale, pairwise_cost

    eps = options.get("eps")
    if isinstance(eps, str) or eps is None:
        return
    with torch.no_grad():
        feats = model.embed(images)
        C = pairwise_cost(feats.reshape(-1, feats.shape[-1]), model.bank.to(feats), options.get("cost", "l2"))
        scale = float(cost_scale(C, options.get("cost_norm", "mean")).reshape(-1)[0])
        spread = float((C - C.min(1, keepdim=True).values).max())
    if spread > MAX_SPREAD_OVER_EPS * eps * scale:
        floor = spread / (MAX_SPREAD_OVER_EPS * scale)
        given = f"--option eps={typed['eps']}" if "eps" in typed else f"eps={eps:g}"
        raise OptionError(f"{given} is degenerate for this bank and folder: the costs spread over "
                          f"{spread / (eps * scale):.3g} times eps (cost scale {scale:.3g}), more than "
                          f"{MAX_SPREAD_OVER_EPS:g}, so Sinkhorn cannot converge: use eps >= {floor:.2g} "
                          "(the profiles use 0.05)")


# ------------------------------------------------------------------------------------------------ outputs


def check_output(path, flag: str, folder: bool = False) -> Path:
    """``path`` (a file, or with ``folder`` a folder) can be written: the nearest existing folder above it (where
    the temporary file or folder goes) takes a probe file, removed at once; nothing else is created.
    :class:`OptionError` naming ``flag`` otherwise."""
    path = Path(path).expanduser()
    if path.is_dir() and not folder:
        raise OptionError(f"{flag} {path} is a folder: give the file to write (e.g. {path / 'out.pt'})")
    if path.exists() and not path.is_dir() and folder:
        raise OptionError(f"{flag} {path} is a file: give a folder to write the outputs into")
    anchor = path.absolute().parent  # a file is written beside itself first, a folder of outputs too
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    try:
        if not anchor.is_dir():
            raise NotADirectoryError(f"{anchor} is a file, not a folder")
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OptionError(f"cannot write {flag} {path} ({reason}): pass {flag} a path in a folder you can "
                          "write to") from None
    return path


@contextmanager
def staged_folder(target):
    """Yield a new temporary folder beside ``target``; when the block succeeds its entries replace those of
    ``target`` (a new ``target`` is one rename), otherwise it is removed. Other files in ``target`` are kept."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield stage
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(stage, 0o777 & ~mask)  # mkdtemp's folder is private (0700)
        if not target.exists():
            os.rename(stage, target)
            return
        for entry in sorted(stage.iterdir(), key=lambda p: (p.is_file(), p.name)):  # folders first, files last
            dest = target / entry.name
            if dest.is_dir() and not dest.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".old", dir=target))
                os.rename(dest, old / entry.name)
                os.rename(entry, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(entry, dest)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def quiet_library(enabled: bool):
    """With ``--quiet`` the progress bars inside PatchCore (bank features, coreset, scoring) are off too."""
    from lib.roda import patchcore

    original = patchcore.progress
    if enabled:
        patchcore.progress = lambda *a, **k: original(*a, **dict(k, disable=True))
    try:
        yield
    finally:
        patchcore.progress = original
