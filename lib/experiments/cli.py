"""``roda``: PatchCore + test-time BatchNorm adaptation on any folder of images, from the command line.

    roda fit GOOD_DIR -o bank.pt                       # normal images -> memory bank
    roda adapt bank.pt SHIFTED_DIR -o adapted.pt       # unlabeled shifted images -> adapted BatchNorm state
    roda score bank.pt SHIFTED_DIR --state adapted.pt -o scores/   # scores.csv + anomaly-map overlays
    roda evaluate bank.pt LABELLED_DIR [--state adapted.pt]        # AUROC where labels / masks exist

Folders are read recursively (png, jpg, bmp, tif; grey, RGB, RGBA, 16-bit). A file that cannot be read
stops the run with its path (``--on-error stop``, default) or is reported and left out (``--on-error
skip``). Options are checked before any compute, by the profiles' rules (``lib.experiments.cli_options``), and
so is every output location. Exit codes: 0 success, 1 failure (bad data, unusable bank or state), 2 usage (bad
arguments, missing or unwritable paths), 130 interrupted. Every output file is written atomically and ``score``'s
folder as a whole: an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.common.data import DataError
from lib.common.folders import FolderDataset, labelled_items, list_images, training_images, write_overlays
from lib.common.utils import OutputError, progress, seed_everything, write_csv, write_json
from lib.experiments import cli_options
from lib.experiments.anomalib_cli import command_for, extend_parser
from lib.experiments.cli_options import (  # noqa: F401 - the exit codes are the command's too
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    NUMBER,
    SEED,
    STEPS,
    CliError,
    OptionError,
    bank_fingerprint,
    check_output,
    check_state_bank,
    setting,
    size,
    staged_folder,
)
from lib.experiments.cli_options import existing as _existing
from lib.experiments.cli_options import readable as _readable


def _roda_defaults() -> dict:
    """The adaptation hyper-parameters of the profiles (lr, momentum, batch size, epochs, loss options)."""
    from lib.experiments.profiles import _BASE

    return dict(_BASE["roda"])


# ---------------------------------------------------------------------------------------------- inputs


def _loader(items, geometry: dict, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False):
    from lib.common.data import make_loader

    return make_loader(FolderDataset(items, geometry.get("resize", 256), geometry.get("crop", 224)), batch_size,
                       shuffle=shuffle, seed=seed, drop_last=drop_last)


def _load_bank(path: str, device: str):
    """The PatchCore bank at ``path`` with the backbone it was built with."""
    from lib.common.backbones import load_backbone
    from lib.roda.patchcore import BankError, PatchCore

    path = _existing(path, "bank file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        meta = blob["meta"]
        prep = dict(meta.get("preprocessing") or {})
        name = prep.get("backbone") or meta["backbone"].get("backbone") or meta["backbone"]["name"]
    except Exception as exc:  # noqa: BLE001 - whatever failed, the file is not a bank
        raise BankError(f"{path} is not a PatchCore bank ({type(exc).__name__}): build one with `roda fit`") from None
    extractor = load_backbone(name, prep.get("weights"), layers=prep.get("layers"), device=device)
    model = PatchCore.load(path, extractor, device=device)
    return model, prep


def _apply_state(model, path: str | None) -> dict:
    if path is None:
        return {}
    from lib.roda.adaptation import load_bn_state

    path = _existing(path, "state file")
    try:
        info = load_bn_state(model.extractor, path)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CliError(f"{path} is not a usable adapted state for this bank's backbone ({exc}): "
                       "create it with `roda adapt` on the same bank") from None
    return info


# -------------------------------------------------------------------------------------------- commands


def cmd_fit(args) -> int:
    from lib.common.backbones import load_backbone
    from lib.common.utils import torch_save
    from lib.roda.bn_stats import recording_bn_moments
    from lib.roda.patchcore import PatchCore

    folder = _existing(args.folder, "folder")
    check_output(args.output, "-o/--output")
    paths, used = training_images(folder)
    items = _readable(paths, args, str(used))
    geometry = dict(resize=args.resize, crop=args.crop)
    seed_everything(args.seed)  # after the checks: torch's deterministic switch alone imports for seconds
    extractor = load_backbone(args.backbone, args.weights, device=args.device)
    model = PatchCore(extractor, coreset_ratio=args.coreset_ratio, max_bank=args.max_bank, seed=args.seed,
                      device=args.device)
    t0 = time.perf_counter()
    with recording_bn_moments(extractor) as recorder:  # the reference of `adapt --bn-init matched`
        model.fit(_loader(items, geometry, args.batch_size),
                  preprocessing=dict(geometry, backbone=args.backbone, weights=args.weights), coverage=True)
    model.save(args.output)
    # beside the bank: what `adapt --bn-init matched` and `--option weights=coverage` need from the training images
    torch_save(dict(moments=recorder.moments(), coverage=model.coverage.cpu(), bank_head=model.bank[:4].cpu()),
               _reference_path(args.output))
    print(f"bank {args.output}: {model.bank.shape[0]} x {model.bank.shape[1]} from {len(items)} images in {used} "
          f"({model.n_train_patches} patches, {args.backbone}) in {time.perf_counter() - t0:.1f} s")
    return EXIT_OK


def _reference_path(bank) -> Path:
    """Where `fit` keeps the training images' BatchNorm input moments: beside the bank."""
    return Path(bank).with_suffix(".bnref.pt")


def _bn_reference(bank, model, key: str = "moments", needed_by: str = "--bn-init matched",
                  instead: str = "use --bn-init target"):
    """``key`` of the training images' record that `fit` keeps beside the bank (checked against the bank)."""
    path = _reference_path(bank)
    blob = torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None
    if blob is None or key not in blob or not torch.allclose(blob["bank_head"], model.bank[:4].cpu()):
        raise CliError(f"{needed_by} needs {path} (with its {key!r}), written by `roda fit` beside the bank it "
                       f"belongs to: rebuild the bank with `roda fit`, or {instead}", EXIT_USAGE)
    return blob[key]


#: what `adapt --variant` takes from a named variant (lib.experiments.profiles); anything else is refused
VARIANT_KEYS = ("method", "loss", "bn_init", "lr", "epochs", "drop_last", "stop")


def _apply_variant(args, r: dict) -> None:
    """Fill the adapt options the user did not give from ``--variant`` (a named variant of the profiles), then the
    profiles' defaults; explicit flags win. A variant's ``stop`` rule is not run (fixed --epochs), and said so."""
    spec = {}
    if args.variant not in (None, "none"):
        variants = r.get("variants") or {}
        if args.variant not in variants:
            raise CliError(f"unknown variant {args.variant!r}: choose one of {sorted(variants)}", EXIT_USAGE)
        spec = dict(variants[args.variant])
        unsupported = sorted(set(spec) - set(VARIANT_KEYS))
        if unsupported:
            raise CliError(f"variant {args.variant!r} sets {unsupported}, which `roda adapt` does not offer: run "
                           "it through lib.experiments.roda_grid instead", EXIT_USAGE)
        if spec.get("stop") and not args.quiet:
            print(f"note: variant {args.variant!r} has a stop rule {spec['stop']}; the CLI adapts for the "
                  "fixed --epochs", file=sys.stderr)
    method = spec.get("method", "roda")
    args.method = args.method or method
    if args.method == "patchcore":  # a statistics-only variant (e.g. adabn_matched): no alignment steps
        args.method, args.epochs = "roda", 0 if args.epochs is None else args.epochs
    args.variant_loss = dict(spec.get("loss", {})) if args.method == method else {}
    args.bn_init = args.bn_init or spec.get("bn_init", "source")
    args.lr = args.lr if args.lr is not None else spec.get("lr", r["lr"])
    args.epochs = args.epochs if args.epochs is not None else spec.get("epochs", r["epochs"])
    args.drop_last = bool(spec.get("drop_last", False))


def cmd_adapt(args) -> int:
    from lib.roda.adaptation import save_bn_state
    from lib.roda.bn_stats import gate_bn_stats, match_bn_stats, reestimate_bn_stats
    from lib.roda.online import OnlineAdapter, default_loss_options

    defaults = _roda_defaults()
    _apply_variant(args, defaults)
    typed = {k.strip(): v for k, _, v in (o.partition("=") for o in args.option)}  # as the user wrote them
    given = cli_options.loss_options(args.method, args.option)
    folder = _existing(args.folder, "folder")
    check_output(args.output, "-o/--output")
    model, prep = _load_bank(args.bank, args.device)
    items = _readable(list_images(folder), args, str(folder))
    options = default_loss_options(args.method, defaults)
    options.update(args.variant_loss)
    options.update(given)
    weights = None
    if options.get("weights") == "coverage":
        weights = _bn_reference(args.bank, model, "coverage", "--option weights=coverage",
                                "use --option weights=uniform")
    gate, plain = {}, _loader(items, prep, args.batch_size, shuffle=False, seed=args.seed)
    if (args.steps or args.epochs) and "eps" in options:  # a degenerate eps, from the first batch's cost scale
        cli_options.check_eps(model, next(iter(plain))["image"][:2], options, typed)
    seed_everything(args.seed)  # after the checks, before the first random draw (statistics, shuffling, views)
    if args.bn_init == "target":  # AdaBN first: the folder's own BatchNorm statistics (no labels)
        reestimate_bn_stats(model, plain)
    elif args.bn_init == "matched":  # the same, referenced to the training images' statistics
        match_bn_stats(model, plain, _bn_reference(args.bank, model))
    elif args.bn_init == "gated":  # matched only if it brings the folder nearer the bank, else source
        gate = gate_bn_stats(model, plain, _bn_reference(args.bank, model, needed_by="--bn-init gated"))
    adapter = OnlineAdapter(model, args.method, options, lr=args.lr, momentum=args.momentum, augment=args.augment,
                            normalize_loss=args.normalize_loss, seed=args.seed, bank_weights=weights)
    loader = _loader(items, prep, args.batch_size, shuffle=True, seed=args.seed, drop_last=args.drop_last)
    if args.drop_last and len(loader) == 0 and args.epochs:
        raise CliError(f"the folder has {len(items)} images, fewer than one batch of {args.batch_size} (variant "
                       f"{args.variant!r} drops incomplete batches): lower --batch-size", EXIT_USAGE)
    total = args.steps or args.epochs * len(loader)
    bar = progress(total=total, desc=f"adapt {args.method}", disable=args.quiet, mininterval=0.5)
    losses, t0 = [], time.perf_counter()
    try:
        while len(losses) < total:
            for batch in loader:
                if len(losses) == total:
                    break
                out = adapter.step(batch["image"])
                if not out["finite"]:
                    raise CliError(f"{args.method} diverged at step {len(losses)} (loss {out['loss']}): lower --lr "
                                   "(nothing was written)")
                losses.append(out["loss"])
                bar.set_postfix(loss=f"{out['loss']:.4g}")
                bar.update(1)
    finally:
        bar.close()
    info = dict(method=args.method, variant=args.variant,
                options={k: v for k, v in options.items() if k != "stats"}, lr=args.lr,
                momentum=args.momentum, augment=args.augment, steps=len(losses), n_images=len(items),
                batch_size=args.batch_size, seed=args.seed, bn_init=args.bn_init, **gate,
                first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                bank=bank_fingerprint(model), bank_file=str(Path(args.bank).resolve()), target=str(folder.resolve()))
    save_bn_state(model.extractor, args.output, info=info)
    start = (f"; --bn-init gated kept the {gate['bn_start']} statistics (mean nearest-bank distance: source "
             f"{gate['nn_source']:.4g}, matched {gate['nn_matched']:.4g})" if gate else "")
    if losses:
        print(f"adapted state {args.output}: {args.method}, {len(losses)} steps on {len(items)} images, loss "
              f"{losses[0]:.4g} -> {losses[-1]:.4g} in {time.perf_counter() - t0:.1f} s" + start)
    else:  # --epochs 0: the BatchNorm statistics of --bn-init alone
        print(f"adapted state {args.output}: BatchNorm statistics ({args.bn_init}) of {len(items)} images, "
              "no alignment steps" + start)
    return EXIT_OK


def _score(model, items, prep, args, desc: str):
    """Patch scores of every item (B, h, w) and image scores."""
    patch, scores = [], []
    for batch in progress(_loader(items, prep, args.batch_size), desc=desc, disable=args.quiet, mininterval=0.5):
        ps = model.patch_scores(batch["image"]).cpu()
        patch.append(ps)
        scores.append(ps.flatten(1).max(1).values)
    return torch.cat(patch), torch.cat(scores).numpy()


def cmd_score(args) -> int:
    folder = _existing(args.folder, "folder")
    out_dir = check_output(args.output, "-o/--output", folder=True)
    check_state_bank(args.bank, args.state, args.force)
    seed_everything(args.seed)
    model, prep = _load_bank(args.bank, args.device)
    state = _apply_state(model, args.state)
    items = _readable(list_images(folder), args, str(folder))
    patch, scores = _score(model, items, prep, args, "scoring")
    table = pd.DataFrame(dict(path=[_relative(p, folder) for p in items], score=scores))
    if args.threshold is not None:
        table["anomalous"] = table["score"] > args.threshold
    with staged_folder(out_dir) as stage:  # moved onto out_dir whole at the end; removed if the run stops
        if not args.no_maps:
            table["map"] = write_overlays(model, items, patch, prep, stage, folder, args.map_range, args.quiet)
        write_csv(table, stage / "scores.csv")
        write_json(dict(bank=str(args.bank), state=args.state, adapted_with=_state_label(state) if state else None,
                        n_images=len(items), map_range=list(args.map_range) if args.map_range
                        else [float(patch.min()), float(patch.max())]), stage / "run.json")
    print(f"{len(items)} images scored ({_state_label(state)}): "
          f"{out_dir / 'scores.csv'}" + ("" if args.no_maps else f", maps in {out_dir / 'maps'}"))
    return EXIT_OK


def _relative(path, folder: Path) -> str:
    """``path`` relative to the scored / evaluated ``folder``: the one convention of every table the CLI writes."""
    return Path(os.path.relpath(Path(path).absolute(), folder.absolute())).as_posix()


def _state_label(state: dict) -> str:
    """How a state file was made, for printouts: ``source state``, ``adapted: roda``, ``adapted: roda after
    matched statistics`` or ``adapted: BatchNorm statistics (matched), no alignment`` (``--epochs 0``)."""
    if not state:
        return "source state"
    bn_init = state.get("bn_start") or state.get("bn_init", "source")  # bn_start: what `--bn-init gated` chose
    if state.get("steps") == 0:
        return f"adapted: BatchNorm statistics ({bn_init}), no alignment"
    return f"adapted: {state['method']}" + (f" after {bn_init} statistics" if bn_init != "source" else "")


def cmd_evaluate(args) -> int:
    from lib.common.metrics import image_auroc, pixel_auroc

    folder = _existing(args.folder, "folder")
    for path, flag in ((args.output, "-o/--output"), (args.json, "--json")):
        if path:
            check_output(path, flag)
    check_state_bank(args.bank, args.state, args.force)
    seed_everything(args.seed)
    model, prep = _load_bank(args.bank, args.device)
    state = _apply_state(model, args.state)
    items, layout = labelled_items(folder)
    items = _readable(items, args, str(folder))
    labels = np.array([i.label for i in items])
    if labels.min() == labels.max():
        only = "anomalous" if labels[0] else "normal"
        raise CliError(f"{folder} ({layout}) holds only {only} images: AUROC needs both")
    out = model.predict(_loader(items, prep, args.batch_size), desc="evaluating",
                        keep_maps=any(i.mask for i in items))
    summary = dict(folder=str(folder), layout=layout, n_images=len(items), n_anomalous=int(labels.sum()),
                   state=args.state, adapted_with=_state_label(state) if state else None,
                   image_auroc=image_auroc(out["labels"], out["scores"]))
    if "masks" in out and out["masks"].any():
        summary["pixel_auroc"] = pixel_auroc(out["masks"], out["maps"])
    print(f"{folder} ({layout}, {len(items)} images, {summary['n_anomalous']} anomalous, "
          f"{_state_label(state)})")
    print(f"image AUROC {100 * summary['image_auroc']:.1f}"
          + (f"   pixel AUROC {100 * summary['pixel_auroc']:.1f}" if "pixel_auroc" in summary else ""))
    if args.output:
        write_csv(pd.DataFrame(dict(path=[_relative(i.path, folder) for i in items], label=labels,
                                    defect=[i.defect for i in items], score=out["scores"])), args.output)
    if args.json:
        write_json(summary, args.json)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    r = _roda_defaults()
    from lib.experiments.profiles import RECOMMENDED
    from lib.roda.adaptation import BN_INITS
    from lib.roda.alignment import ALIGNMENT_LOSSES

    ap = argparse.ArgumentParser(prog="roda", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p, batch_size=16):
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (CUDA when present)")
        p.add_argument("--batch-size", type=setting("patchcore.batch_size"), default=batch_size,
                       help="images per batch")
        p.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                       help="an unreadable image stops the run (default) or is reported and skipped")
        p.add_argument("--seed", type=setting(SEED), default=0, help="seed of the coreset / shuffling / augmentation")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings")

    fmt = cli_options.HelpFormatter  # each default once
    p = sub.add_parser("fit", help="build a memory bank from a folder of normal images", formatter_class=fmt,
                       description="Build a PatchCore memory bank (coreset of patch features) from normal images.")
    p.add_argument("folder", help="folder of normal (good) images, read recursively")
    p.add_argument("-o", "--output", required=True, help="bank file to write (e.g. bank.pt)")
    p.add_argument("--backbone", default="mobilenet_v2", help="feature extractor (lib.common.backbones)")
    p.add_argument("--weights", default=None, help="weights file or tag (default: the bundled ImageNet weights)")
    p.add_argument("--resize", type=size, default=256, help="shorter side after resizing (or HxW, or none)")
    p.add_argument("--crop", type=size, default=224, help="center crop (or HxW, or none: keep the whole image)")
    p.add_argument("--coreset-ratio", type=setting("patchcore.coreset_ratio"), default=0.01,
                   help="share of patches kept in the bank")
    p.add_argument("--max-bank", type=setting("patchcore.max_bank", zero_is_none=True), default=2500,
                   help="cap on the bank size (0 or none: no cap)")
    common(p)
    p.set_defaults(run=cmd_fit)

    p = sub.add_parser("adapt", help="adapt the encoder's BatchNorm to unlabeled shifted images", formatter_class=fmt,
                       description="Test-time adaptation (RoDA and baselines): move the encoder's BatchNorm affine "
                                   "parameters so that the shifted images' patch features align with the bank. No "
                                   "labels are read. Writes a small state file for `score --state`.")
    p.add_argument("bank", help="bank file from `roda fit`")
    p.add_argument("folder", help="folder of unlabeled images from the new condition (camera, lens, light)")
    p.add_argument("-o", "--output", required=True, help="adapted state file to write (e.g. adapted.pt)")
    p.add_argument("--variant", default=RECOMMENDED, choices=[*sorted(r.get("variants") or {}), "none"], metavar="NAME",
                   help="named variant (docs/recommendation.md's by default; none: the paper's RoDA); flags win")
    p.add_argument("--method", default=None, choices=sorted(ALIGNMENT_LOSSES),
                   help="alignment loss (default: the variant's, else roda)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="loss option, e.g. --option eps=0.1 --option rule=and (roda: eps, rule, cost, cost_norm)")
    p.add_argument("--bn-init", choices=BN_INITS, default=None,
                   help="target: AdaBN on the folder first, then adapt; matched: AdaBN referenced to the training "
                        "images (kept by `fit`); gated: matched only if it brings the folder nearer the bank")
    p.add_argument("--epochs", type=setting("roda.epochs"), default=None,
                   help=f"passes over the folder (default: the variant's, else {r['epochs']}; 0: only the "
                        "BatchNorm statistics of --bn-init, no alignment)")
    p.add_argument("--steps", type=setting(STEPS), default=None, help="a fixed number of steps instead of --epochs")
    p.add_argument("--lr", type=setting("roda.lr"), default=None,
                   help=f"SGD learning rate (default: the variant's, else {r['lr']})")
    p.add_argument("--momentum", type=setting("roda.momentum"), default=r["momentum"], help="SGD momentum")
    p.add_argument("--augment", choices=("flip_rot90", "none"), default="flip_rot90",
                   help="add one flipped / rotated view of each image to its batch")
    p.add_argument("--normalize-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="divide the loss by its first value (default: on for ttac only)")
    common(p, batch_size=r["batch_size"])
    p.set_defaults(run=cmd_adapt)

    p = sub.add_parser("score", help="score a folder: a CSV of image scores and anomaly-map overlays",
                       formatter_class=fmt, description="Image scores (max patch distance to the bank) and anomaly "
                                                        "maps of every image.")
    p.add_argument("bank", help="bank file from `roda fit`")
    p.add_argument("folder", help="folder of images to score, read recursively")
    p.add_argument("-o", "--output", required=True, help="output folder (scores.csv, run.json, maps/)")
    p.add_argument("--state", default=None, help="adapted state from `roda adapt` (default: the source encoder)")
    p.add_argument("--threshold", type=setting(NUMBER), default=None,
                   help="add an `anomalous` column: score > threshold")
    p.add_argument("--no-maps", action="store_true", help="write scores.csv only")
    p.add_argument("--force", action="store_true", help="use a --state adapted against another bank")
    p.add_argument("--map-range", type=setting(NUMBER), nargs=2, default=None, metavar=("LO", "HI"),
                   help="colour scale of the maps (default: min / max patch score over the folder)")
    common(p)
    p.set_defaults(run=cmd_score)

    p = sub.add_parser("evaluate", help="AUROC on a labelled folder", formatter_class=fmt,
                       description="Image AUROC (and pixel AUROC where masks exist) on a folder with labels: an "
                                   "MVTec AD category, a labels.csv, or good/ beside folders of anomalous images.")
    p.add_argument("bank", help="bank file from `roda fit`")
    p.add_argument("folder", help="labelled folder")
    p.add_argument("--state", default=None, help="adapted state from `roda adapt` (default: the source encoder)")
    p.add_argument("-o", "--output", default=None, help="CSV of per-image scores and labels (paths relative to the "
                                                         "folder, as in `score`'s scores.csv)")
    p.add_argument("--json", default=None, help="JSON file for the summary")
    p.add_argument("--force", action="store_true", help="use a --state adapted against another bank")
    common(p)
    p.set_defaults(run=cmd_evaluate)
    return extend_parser(ap)  # anomalib checkpoints: lib.experiments.anomalib_cli


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit with 2 here
    from lib.common.backbones import BackboneError
    from lib.roda.adaptation import AdaptationError
    from lib.roda.online import StreamError
    from lib.roda.patchcore import BankError

    if getattr(args, "max_bank", None) == 0:
        args.max_bank = None
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        with cli_options.quiet_library(args.quiet):
            return (command_for(args) or args.run)(args)  # an anomalib checkpoint: its own commands
    except CliError as err:
        print(f"roda {args.command}: error: {err}", file=sys.stderr)
        return err.code
    except OptionError as err:
        print(f"roda {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OutputError as err:
        print(f"roda {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except (DataError, BankError, AdaptationError, StreamError, BackboneError, ValueError) as err:
        print(f"roda {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except RuntimeError as err:
        if "stack expects each tensor to be equal size" not in str(err):
            raise
        print(f"roda {args.command}: error: the images differ in size after resizing and cropping: pass "
              "--crop (a square crop) or --resize HxW to `roda fit`", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"roda {args.command}: interrupted (no partial output was written)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

