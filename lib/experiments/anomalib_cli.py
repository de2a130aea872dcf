"""``roda adapt / score / evaluate`` on an anomalib PatchCore checkpoint (the optional ``anomalib`` extra).

    roda adapt model.ckpt SHIFTED_DIR -o adapted.ckpt     # a checkpoint anomalib loads, BatchNorm adapted
    roda score adapted.ckpt SHIFTED_DIR -o scores/         # scores.csv + anomaly-map overlays
    roda evaluate adapted.ckpt LABELLED_DIR                # AUROC where labels / masks exist

Where the ``roda`` command takes a bank, it also takes an anomalib Lightning checkpoint of a ``Patchcore``
(``Engine.fit`` writes one; recognised by its ``pytorch-lightning_version`` entry, whatever its suffix).
``adapt`` runs :func:`lib.roda.anomalib_model.adapt_patchcore` with the same options as on a bank (``--variant``,
``--method``, ``--option``, ``--bn-init``, ``--lr``, ``--epochs``, ...) and writes the source checkpoint again with
the adapted BatchNorm tensors (memory bank, other weights and anomalib's pre- and post-processor settings
unchanged): ``Patchcore.load_from_checkpoint`` and ``Engine.predict(ckpt_path=...)`` load it. ``--bn-init
matched`` / ``gated`` and ``--option weights=coverage`` need ``--train-images`` (the normal images the bank was
filled from). ``score`` and ``evaluate`` use anomalib's own scores and maps (``PatchcoreModel`` in eval mode, the
raw distances, before anomalib's post-processor normalises them) on images read through the checkpoint's
``PreProcessor``. anomalib's thresholds and normalisation statistics stay those of the source checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.common.utils import atomic_path, progress, resolve_device, write_csv, write_json

#: the ``roda`` sub-commands whose first argument may be an anomalib checkpoint instead of a bank
COMMANDS = ("adapt", "score", "evaluate")


def is_lightning_checkpoint(path) -> bool:
    """Whether ``path`` is a torch zip file whose pickle holds Lightning's ``pytorch-lightning_version`` entry
    (reads the small pickle only, never the tensors; needs no anomalib)."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            return bool(names) and b"pytorch-lightning_version" in archive.read(names[0])
    except (OSError, zipfile.BadZipFile):
        return False


def command_for(args):
    """The anomalib variant of ``args.command`` when its first argument is a Lightning checkpoint, else None."""
    if args.command in COMMANDS and is_lightning_checkpoint(getattr(args, "bank", "")):
        return dict(adapt=cmd_adapt, score=cmd_score, evaluate=cmd_evaluate)[args.command]
    return None


def extend_parser(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the anomalib-only options to ``roda adapt`` and say in every ``bank`` help that a checkpoint works."""
    subparsers = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    for name in COMMANDS:
        for action in subparsers.choices[name]._actions:
            if action.dest == "bank":
                action.help += ", or an anomalib Patchcore checkpoint (.ckpt, the anomalib extra)"
    p = subparsers.choices["adapt"]
    p.add_argument("--train-images", default=None, metavar="DIR",
                   help="anomalib checkpoint only: the normal images its bank was filled from (needed by --bn-init "
                        "matched / gated and --option weights=coverage)")
    p.add_argument("--bank-rows", type=int, default=None, metavar="N",
                   help="anomalib checkpoint only: align against a seeded random subset of N bank entries (scoring "
                        "keeps the whole bank)")
    return ap


# ---------------------------------------------------------------------------------------------- commands


def _load(args):
    from lib.roda.anomalib_model import load_patchcore

    return load_patchcore(args.bank, map_location=resolve_device(args.device))


def _items(args, folder: Path) -> list:
    from lib.common.folders import list_images
    from lib.experiments.cli import _readable

    return _readable(list_images(folder), args, str(folder))


def _plain(value):
    """Plain data for a ``weights_only`` checkpoint (numbers, strings, lists, dicts)."""
    return json.loads(json.dumps(value, default=str))


def adapt_config(args):
    """The :class:`lib.roda.adaptation.AdaptConfig` of ``roda adapt``'s flags and ``--variant``, filled as on a bank
    (``lib.experiments.cli``: explicit flags win over the variant, the variant over the profiles' defaults)."""
    from lib.experiments.cli import _apply_variant, _roda_defaults
    from lib.experiments.cli_options import loss_options
    from lib.roda.adaptation import AdaptConfig
    from lib.roda.online import default_loss_options

    defaults = _roda_defaults()
    _apply_variant(args, defaults)
    options = default_loss_options(args.method, defaults)
    options.update(args.variant_loss)
    options.update(loss_options(args.method, args.option))
    normalize = args.method == "ttac" if args.normalize_loss is None else bool(args.normalize_loss)
    statistics_only = args.epochs == 0 and not args.steps
    return AdaptConfig(method="patchcore" if statistics_only else args.method, epochs=args.epochs, steps=args.steps,
                       lr=args.lr, momentum=args.momentum, batch_size=args.batch_size, augment=args.augment,
                       bn_init=args.bn_init, seed=args.seed, loss=options, normalize_loss=normalize,
                       drop_last=args.drop_last)


def cmd_adapt(args) -> int:
    from lib.common.utils import seed_everything
    from lib.experiments.cli import EXIT_OK, EXIT_USAGE, CliError, _existing
    from lib.experiments.cli_options import check_output
    from lib.roda.anomalib_model import adapt_patchcore, save_adapted_checkpoint

    config = adapt_config(args)
    folder = _existing(args.folder, "folder")
    check_output(args.output, "-o/--output")
    items = _items(args, folder)
    train = _items(args, _existing(args.train_images, "folder")) if args.train_images else None
    module = _load(args)  # refuses a checkpoint that is not a PatchCore
    needs_train = config.bn_init in ("matched", "gated") or config.loss.get("weights") == "coverage"
    if needs_train and not args.train_images:
        raise CliError(f"{args.variant or config.method} starts from the training images' BatchNorm statistics or "
                       "bank coverage, which an anomalib checkpoint does not keep: pass --train-images FOLDER (the "
                       "normal images the checkpoint was fitted on), or --variant none for the paper's RoDA",
                       EXIT_USAGE)
    seed_everything(args.seed)  # after the checks, as on a bank
    t0 = time.perf_counter()
    module, history = adapt_patchcore(module, items, config, train_images=train, bank_rows=args.bank_rows,
                                      show_progress=not args.quiet)
    losses = history["loss"].tolist() if "loss" in history else []
    info = dict(method=config.method, variant=args.variant, options=dict(config.loss),
                lr=config.lr, momentum=config.momentum, augment=config.augment, steps=len(losses),
                n_images=len(items), batch_size=config.batch_size, seed=config.seed, bn_init=config.bn_init,
                **history.attrs, bank_rows=args.bank_rows, first_loss=losses[0] if losses else None,
                last_loss=losses[-1] if losses else None, source=str(Path(args.bank).resolve()),
                target=str(folder.resolve()))
    save_adapted_checkpoint(args.bank, module, args.output, _plain(info))
    took = time.perf_counter() - t0
    if losses:
        print(f"adapted checkpoint {args.output}: {config.method}, {len(losses)} steps on {len(items)} images, loss "
              f"{losses[0]:.4g} -> {losses[-1]:.4g} in {took:.1f} s (from {history.attrs['bn_start']} statistics)")
    else:
        print(f"adapted checkpoint {args.output}: BatchNorm statistics ({history.attrs['bn_start']}) of "
              f"{len(items)} images, no alignment steps")
    return EXIT_OK


def predict(module, items, batch_size: int, quiet: bool, desc: str = "scoring") -> dict:
    """anomalib's raw image scores (N,), anomaly maps (N, H, W) and, where items carry masks, the masks as the
    ``PreProcessor`` transforms them, for ``items`` (paths or :class:`lib.common.folders.Item`)."""
    from lib.common.data import make_loader
    from lib.roda.anomalib_model import PreprocessedImages

    paths = [getattr(i, "path", i) for i in items]
    masks = [getattr(i, "mask", None) for i in items]
    data = PreprocessedImages(paths, module.pre_processor.transform, masks=masks)
    model = module.model.eval()
    scores, maps, gt = [], [], []
    with torch.no_grad():
        for batch in progress(make_loader(data, batch_size), desc=desc, disable=quiet, mininterval=0.5):
            out = model(batch["image"].to(model.memory_bank.device))
            scores.append(out.pred_score.reshape(-1).cpu())
            maps.append(out.anomaly_map.reshape(len(batch["image"]), *out.anomaly_map.shape[-2:]).cpu())
            gt.append(batch["mask"][:, 0].bool())
    return dict(scores=torch.cat(scores).numpy(), maps=torch.cat(maps).numpy(), masks=torch.cat(gt).numpy())


def aurocs(module, items, batch_size: int, quiet: bool) -> tuple[dict, dict]:
    """:func:`predict` on labelled ``items`` and their image AUROC (and pixel AUROC where items carry masks)."""
    from lib.common.metrics import image_auroc, pixel_auroc

    labels = np.array([i.label for i in items])
    out = predict(module, items, batch_size, quiet, desc="evaluating")
    scores = dict(image_auroc=image_auroc(labels, out["scores"]))
    if any(i.mask for i in items):
        scores["pixel_auroc"] = pixel_auroc(out["masks"], out["maps"])
    return out, scores


def _label(info: dict) -> str:
    from lib.experiments.cli import _state_label

    return _state_label(info) if info else "source checkpoint"


def _reject_state(args):
    from lib.experiments.cli import EXIT_USAGE, CliError

    if args.state is not None:
        raise CliError("--state is for banks of `roda fit`: an adapted anomalib checkpoint holds its own state; "
                       "pass it in place of the source checkpoint", EXIT_USAGE)


def _overlays(items, maps, out_dir: Path, folder: Path, map_range, quiet: bool) -> list[str]:
    """``maps/`` as ``roda score`` writes it on a bank: each image (resized to its map) beside its map."""
    from PIL import Image

    from lib.common.folders import overlay, read_rgb

    lo, hi = map_range if map_range else (float(maps.min()), float(maps.max()))
    names = []
    for path, amap in progress(list(zip(items, maps)), desc="maps", disable=quiet, mininterval=0.5):
        image = np.asarray(read_rgb(path).resize(amap.shape[::-1], Image.BILINEAR), dtype=np.uint8)
        rel = Path(path).resolve().relative_to(folder.resolve())
        target = out_dir / "maps" / (rel if rel.suffix.lower() == ".png" else rel.with_name(rel.name + ".png"))
        with atomic_path(target, suffix=".png") as tmp:
            Image.fromarray(overlay(image, amap, lo, hi)).save(tmp, format="PNG")
        names.append(str(target.relative_to(out_dir)))
    return names


def cmd_score(args) -> int:
    from lib.experiments.cli import EXIT_OK, _existing
    from lib.experiments.cli_options import check_output, staged_folder
    from lib.roda.anomalib_model import adaptation_info

    _reject_state(args)
    folder = _existing(args.folder, "folder")
    out_dir = check_output(args.output, "-o/--output", folder=True)
    module = _load(args)
    info = adaptation_info(args.bank)
    items = _items(args, folder)
    out = predict(module, items, args.batch_size, args.quiet)
    table = pd.DataFrame(dict(path=[str(Path(p).resolve().relative_to(folder.resolve())) for p in items],
                              score=out["scores"]))
    if args.threshold is not None:
        table["anomalous"] = table["score"] > args.threshold
    with staged_folder(out_dir) as stage:  # moved onto out_dir whole at the end; removed if the run stops
        if not args.no_maps:
            table["map"] = _overlays(items, out["maps"], stage, folder, args.map_range, args.quiet)
        write_csv(table, stage / "scores.csv")
        write_json(dict(checkpoint=str(args.bank), adapted_with=_label(info), n_images=len(items),
                        map_range=list(args.map_range) if args.map_range else [float(out["maps"].min()),
                                                                               float(out["maps"].max())]),
                   stage / "run.json")
    print(f"{len(items)} images scored ({_label(info)}): {out_dir / 'scores.csv'}"
          + ("" if args.no_maps else f", maps in {out_dir / 'maps'}"))
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from lib.common.folders import labelled_items
    from lib.experiments.cli import EXIT_OK, CliError, _existing, _readable
    from lib.experiments.cli_options import check_output
    from lib.roda.anomalib_model import adaptation_info

    _reject_state(args)
    folder = _existing(args.folder, "folder")
    for path, flag in ((args.output, "-o/--output"), (args.json, "--json")):
        if path:
            check_output(path, flag)
    module = _load(args)
    info = adaptation_info(args.bank)
    items, layout = labelled_items(folder)
    items = _readable(items, args, str(folder))
    labels = np.array([i.label for i in items])
    if labels.min() == labels.max():
        raise CliError(f"{folder} ({layout}) holds only {'anomalous' if labels[0] else 'normal'} images: AUROC "
                       "needs both")
    out, scores = aurocs(module, items, args.batch_size, args.quiet)
    summary = dict(folder=str(folder), layout=layout, n_images=len(items), n_anomalous=int(labels.sum()),
                   checkpoint=str(args.bank), adapted_with=_label(info), **scores)
    print(f"{folder} ({layout}, {len(items)} images, {summary['n_anomalous']} anomalous, {_label(info)})")
    print(f"image AUROC {100 * summary['image_auroc']:.1f}"
          + (f"   pixel AUROC {100 * summary['pixel_auroc']:.1f}" if "pixel_auroc" in summary else ""))
    if args.output:
        rel = [str(Path(i.path).resolve().relative_to(folder.resolve())) for i in items]  # as in scores.csv
        write_csv(pd.DataFrame(dict(path=rel, label=labels, defect=[i.defect for i in items],
                                    score=out["scores"])), args.output)
    if args.json:
        write_json(summary, args.json)
    return EXIT_OK

