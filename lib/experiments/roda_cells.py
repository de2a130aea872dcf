"""RoDA runs as cells of :mod:`lib.experiments.executor`: one row of notebook 03's table (:func:`roda_cell`), one
run of notebook 04's ablations (:func:`ablation_cell`), and the cells of a profile's table (:func:`profile_cells`).
``scripts/run_roda_grid.py --backend ray`` runs them on a Ray cluster."""

from __future__ import annotations

from lib.experiments.executor import expand

_EXTRACTORS: dict = {}  # per process: a worker loads the backbone once for all the cells it runs


def _adapt_cell(cfg, cell: dict, fraction: float, overrides: dict):
    """The run behind a RoDA cell: bank of (task, seed), split of ``fraction``, adaptation, evaluation.
    Returns ``(result, history, bank metadata, extractor)`` of :func:`lib.experiments.roda_grid.adapt_and_evaluate`."""
    from lib.common.backbones import load_backbone
    from lib.common.utils import seed_everything
    from lib.experiments import roda_grid, roda_steps

    # each cell from the same state, whatever ran before it in this process, with torch's deterministic
    # kernels (a worker process or a notebook kernel that never seeded would otherwise accumulate the RoDA
    # loss's gradient with unordered atomic adds on two or more threads)
    seed_everything(int(cell["seed"]))
    name = (cfg["backbone"], cfg.get("backbone_weights"), cfg["device"])
    if name not in _EXTRACTORS:
        _EXTRACTORS[name] = load_backbone(*name[:2], device=cfg["device"])
    extractor, seed = _EXTRACTORS[name], int(cell["seed"])
    task = roda_steps.resolve_task(cfg, cell["task"])
    model, bank = roda_steps.fit_or_load_bank(cfg, task, extractor, seed=seed)
    if fraction >= 1.0:  # Table 5's transductive row: adapt on every target image, evaluate on the same
        adapt_split = eval_split = list(task.test)
    else:
        adapt_split, eval_split = roda_steps.target_split(task, fraction, seed)
    config = roda_grid.config_from_profile(cfg, cell["method"], seed=seed, **overrides)
    res, hist = roda_grid.adapt_and_evaluate(model, task, adapt_split, eval_split, cell["corruption"],
                                              int(cell["severity"]), config, eval_seed=seed,
                                              batch_size=cfg["patchcore"]["batch_size"])
    return res, hist, bank, extractor


def roda_cell(cell: dict) -> dict:
    """One row of notebook 03's table (``results/<profile>/03_roda.csv``) as a cell function.

    ``cell``: ``profile``, ``task``, ``corruption``, ``severity``, ``seed``, ``method`` (``"patchcore"``: no
    adaptation; else a method of :mod:`lib.roda.adaptation`), and optionally ``stage`` (the corruption stage; default
    the profile's), ``data_root``, ``device`` (default
    ``"auto"``: the GPU Ray gave the worker, else CPU), ``out_dir`` (where the profile's cache of banks lives).
    The bank of (task, backbone, seed) is built once per machine and cached like the notebooks do.
    """
    from lib.experiments.profiles import get_profile

    cfg = get_profile(cell.get("profile", "default"), data_root=cell.get("data_root"),
                      device=cell.get("device", "auto"), out_dir=cell.get("out_dir"),
                      **({"corruption": {"stage": cell["stage"]}} if "stage" in cell else {}))
    res, _, bank, extractor = _adapt_cell(cfg, cell, cfg["corruption"]["adapt_fraction"], {})
    return dict(backbone=extractor.name, image_auroc=float(res["image_auroc"]), pixel_auroc=float(res["pixel_auroc"]),
                adapt_seconds=round(float(res["adapt_seconds"]), 1), steps=int(res["steps"]),
                diverged=res["diverged"], bank_size=int(bank["bank_size"]), device=cfg["device"])


def ablation_cell(cfg, cell: dict) -> dict:
    """One adaptation run of notebook 04 (none for ``method="patchcore"``), scored on its seed's evaluation split.

    ``cfg``: the notebook's resolved profile (bind it with ``functools.partial``); ``cell``: ``task``,
    ``seed``, ``corruption``, ``severity``, ``method``, ``fraction`` (the adaptation share of the target
    images; ``>= 1``: adapt on every target image and evaluate on the same images, Table 5's transductive
    row) and ``overrides``
    (:func:`lib.experiments.roda_grid.config_from_profile` keywords, e.g. ``augment``, ``steps``).
    Returns image / pixel AUROC, steps, adaptation seconds and the last loss.
    """
    res, hist, _, _ = _adapt_cell(cfg, cell, float(cell["fraction"]), dict(cell.get("overrides") or {}))
    return dict(image_auroc=float(res["image_auroc"]), pixel_auroc=float(res["pixel_auroc"]), steps=int(res["steps"]),
                adapt_seconds=float(res["adapt_seconds"]),
                final_loss=float(hist.loss.iloc[-1]) if len(hist) else float("nan"))


def profile_cells(profile: str = "default", methods=None, seeds=None, **profile_kwargs) -> list[dict]:
    """The cells of notebook 03's table for a profile: task x corruption x severity x seed x method (each with the
    profile's corruption stage, so a result file of one stage is never taken for the other's).

    ``profile_kwargs`` go to
    :func:`lib.experiments.profiles.get_profile` (``data_root``, ``categories``, ...) and the ones a
    worker needs (``data_root``, ``out_dir``, ``device``) are copied into every cell."""
    from lib.experiments.profiles import get_profile

    cfg = get_profile(profile, **profile_kwargs)
    extra = {k: str(v) for k, v in profile_kwargs.items() if k in ("data_root", "out_dir", "device") and v is not None}
    cells = expand(profile=profile, task=list(cfg["tasks"]), corruption=list(cfg["corruption"]["names"]),
                   severity=int(cfg["corruption"]["severity"]), stage=cfg["corruption"]["stage"],
                   seed=list(seeds or cfg["seeds"]),
                   method=list(methods or cfg["roda"]["methods"]))
    return [dict(c, **extra) for c in cells]
