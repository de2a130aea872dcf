"""The claims of RoDA and DPDL as data: what each compares, read by :mod:`lib.reporting.fidelity`.

:data:`RODA_PAIRS` is a table, one row per comparison of RoDA's tables (id, kind, text, paper rows, our file
and selectors, over which corruptions); :func:`expand` turns a row into :class:`Claim` objects. The DPDL
claims come from the product of the tables below (settings x M x baselines, datasets of the registry, the
ablation heads). Adding a claim is adding a row. Keys of ``references/paper_numbers.csv`` are built with
:func:`reference_key`; tests check that every key exists.

Each claim names the table it reads (``file``: a stem of ``results/<profile>/``, or several in order of
preference, the first that holds matching rows answering), the filter of its two sides (``a`` / ``b``) and the
metric. RoDA's Table 1 and 3 claims read the RoDA grid (``08_roda_grid``, written by
``scripts/run_roda_grid.py``) at the paper's severity :data:`PAPER_SEVERITY`, over every category and seed it
holds; where a profile has no grid, notebook 08's and notebook 03's tables of the same layout answer. Table 4
and Fig. 5b read the grid's runs of those rows (its :func:`~lib.reporting.protocol_tables.grid_views`) before
notebook 04's tables. The
corruption stage is chosen by :func:`lib.reporting.fidelity.fidelity_table`, not by the claim.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from lib.common.registry import MVTEC_CATEGORIES, PAPER_CORRUPTIONS, TASKS
from lib.reporting.protocol_tables import GRID_FIG5B, GRID_TABLE4

MVTEC_TASKS = tuple(f"mvtec/{c}" for c in MVTEC_CATEGORIES)
CORRUPTIONS = PAPER_CORRUPTIONS
PAPER_SEVERITY = 5  # RoDA's Table 1 and 3: severity 5 of every corruption
RODA_GRID = ("08_roda_grid", "08_roda_runs", "03_roda")  # the grid; notebook 08's and 03's tables where absent
TABLE4_FILES = (GRID_TABLE4, "04_table4")  # the grid's Table 4 rows; notebook 04's where the grid ran none
FIG5B_FILES = (GRID_FIG5B, "04_fig5b")  # the grid's severity sweep; notebook 04's where the grid ran none

Selector = Any  # a where-dict {column: value | list (any of) | "max"/"min" (the extreme present) | callable},
# or a tuple of (coefficient, where-dict) terms that are summed per seed


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9+]+", "_", str(text).lower()).strip("_").replace("+", "p")


def reference_key(paper, table, dataset, setting, method, metric, category=None) -> str:
    """The ``key`` of a row of ``paper_numbers.csv`` (same slugs as the file)."""
    return ":".join([paper, slug(table), slug(dataset), slug(category) if category else "-", slug(setting),
                     slug(method), metric])


@dataclass
class Claim:
    """One checkable statement of a paper.

    ``paper_a`` / ``paper_b``: reference keys (averaged when several). ``file``: our result table (stem), or
    several in order of preference (:attr:`files`). ``a`` / ``b``: which of our rows give A and B (a
    :data:`Selector`). ``expect``: +1 "A above B", -1 "A below B"; None takes the sign of the paper's numbers.
    ``tasks``: our tasks the claim applies to (None: every task of the file). Our effect is always the mean over
    the categories (tasks) of the mean over their seeds, the paper's class mean (:mod:`lib.reporting.fidelity`).
    """

    id: str
    paper: str
    text: str
    kind: str
    paper_a: tuple = ()
    paper_b: tuple = ()
    file: str | tuple = RODA_GRID
    a: Selector = field(default_factory=dict)
    b: Selector = None
    metric: str = "image_auroc"
    label_a: str = "A"
    label_b: str = "B"
    expect: int | None = None
    scale: float = 1.0
    tasks: tuple | None = None
    paper_backbone: str = "WRN-50"
    paper_data: str = "MVTec AD, mean over 15 classes"
    data_tasks: tuple | None = None  # our tasks that make up the paper's data (absolute claims)
    paper_params: dict = field(default_factory=dict)  # settings that must match for absolute claims
    figure_only: str = ""  # the paper shows it only as a plot: what the text says
    note: str = ""

    def __post_init__(self):
        if self.kind not in ("gap", "order", "absolute", "ratio"):
            raise ValueError(f"claim {self.id}: kind must be gap/order/absolute/ratio, got {self.kind!r}")
        if self.kind != "absolute" and self.b is None:
            raise ValueError(f"claim {self.id}: a {self.kind} claim needs b")

    @property
    def files(self) -> tuple:
        """The tables that may answer the claim, in order of preference."""
        return (self.file,) if isinstance(self.file, str) else tuple(self.file)


# ----------------------------------------------------------------------------------------------------
# RoDA
# ----------------------------------------------------------------------------------------------------

#: RoDA's pairwise claims, one row each: (id, kind, text, paper table, paper method A, paper method B,
#: our file, our column, our A, our B, over, options). ``over``: "each" (one claim per corruption), "mean"
#: (the mean over the corruptions, paper: the per-corruption rows), "mean-row" (paper: its "mean" row), or a
#: paper setting (no condition). ``options``: Claim fields (metric, expect, scale, labels, ...) and ``where``
#: (extra selectors of our rows for both sides).
SEV5 = dict(where=dict(severity=PAPER_SEVERITY))
RODA_PAIRS = (
    ("t1_roda_vs_patchcore", "gap", "RoDA beats PatchCore", "Table 1", "RoDA", "PatchCore", RODA_GRID, "method",
     "roda", "patchcore", ("each", "mean-row"), SEV5),
    ("t1_roda_vs_tttpp", "order", "RoDA beats TTT++", "Table 1", "RoDA", "TTT++", RODA_GRID, "method", "roda",
     "ttt++", ("each",), SEV5),
    ("t1_ttac_vs_patchcore", "order", "TTAC underperforms PatchCore", "Table 1", "TTAC", "PatchCore", RODA_GRID,
     "method", "ttac", "patchcore", ("each",), SEV5),
    ("t1_tttpp_vs_patchcore_mean", "order", "TTT++ improves on PatchCore", "Table 1", "TTT++", "PatchCore", RODA_GRID,
     "method", "ttt++", "patchcore", ("mean-row",), SEV5),
    ("t3_roda_vs_patchcore_pixel", "gap", "RoDA beats PatchCore in pixel AUROC", "Table 3", "RoDA", "PatchCore",
     RODA_GRID, "method", "roda", "patchcore", ("each",), dict(metric="pixel_auroc", **SEV5)),
    ("t4_discrete_vs_continuous", "order", "discrete beats continuous OT", "Table 4", "OT + discrete",
     "OT + continuous", TABLE4_FILES, "row", "ot_discrete", "ot_continuous", ("each",),
     dict(label_a="discrete", label_b="continuous")),
    ("t4_augment_vs_copy", "order", "augmentation beats direct copy", "Table 4",
     "OT + discrete + data augment. (RoDA)", "OT + discrete + direct copy", TABLE4_FILES, "row",
     "ot_discrete_augment", "ot_discrete_copy", ("each",), dict(label_a="augment", label_b="copy")),
    ("t4_moment_matching_vs_kl", "order", "moment matching beats KL alignment", "Table 4", "Moment Matching",
     "KL-Div.", TABLE4_FILES, "row", "moment_matching", "kl", ("mean",), {}),
    ("t4_ot_discrete_vs_moment_matching", "order", "discrete OT beats moment matching", "Table 4", "OT + discrete",
     "Moment Matching", TABLE4_FILES, "row", "ot_discrete", "moment_matching", ("mean",), {}),
    ("t4_ot_discrete_vs_ot_hungarian", "order", "discrete OT beats the Hungarian assignment", "Table 4",
     "OT + discrete", "OT + Hungarian", TABLE4_FILES, "row", "ot_discrete", "ot_hungarian", ("mean",), {}),
    ("t4_kl_vs_no_alignment", "order", "KL alignment is worse than no alignment", "Table 4", "KL-Div.",
     "no alignment", TABLE4_FILES, "row", "kl", "no_alignment", ("mean",), {}),
    ("t4_ot_discrete_augment_vs_no_alignment", "order", "full RoDA beats no alignment", "Table 4",
     "OT + discrete + data augment. (RoDA)", "no alignment", TABLE4_FILES, "row", "ot_discrete_augment",
     "no_alignment", ("mean",), {}),
    ("t5_20pct_reaches_98pct", "ratio", "20% adaptation data reaches >= 98% of the 100% upper bound", "Table 5",
     "RoDA (adapt 20%)", "RoDA (adapt 100%)", "04_table5", "adapt_fraction", 0.2, 1.0, ("mean-row",),
     dict(label_a="20%", label_b="100%", expect=1, scale=0.98)),
    ("t5_100pct_vs_20pct", "order", "adapting on all target data beats 20%", "Table 5", "RoDA (adapt 100%)",
     "RoDA (adapt 20%)", "04_table5", "adapt_fraction", 1.0, 0.2, ("mean-row",), dict(label_a="100%", label_b="20%")),
    *((f"fig5a_{a}_vs_{b}", "order", f"{na} assigns fewer anomalous patches than {nb}", "Fig. 5a", na, nb, "04_fig5a",
       "augment", a, b, ("one batch (condition not stated)",),
       dict(metric="share_assigned", label_a=a, label_b=b, paper_data="MVTec AD, one adaptation batch (class and "
            "corruption not stated)", note="share of anomalous target patches that receive an assignment, percent"))
      for (a, na), (b, nb) in ((("flip_rot90", "data augmentation (RoDA)"), ("none", "no augmentation")),
                               (("flip_rot90", "data augmentation (RoDA)"), ("copy", "direct copy")),
                               (("copy", "direct copy"), ("none", "no augmentation")))),
)


def _rk(table, setting, method, metric="image_auroc", dataset="MVTec", category=None, paper="roda"):
    return reference_key(paper, table, dataset, setting, method, metric, category)


def expand(row) -> list[Claim]:
    """The claims of one row of :data:`RODA_PAIRS`."""
    cid, kind, text, table, pa, pb, file, column, oa, ob, overs, options = row
    options = dict(options)
    metric = options.get("metric", "image_auroc")
    where = options.pop("where", {})
    labels = dict(label_a=pa, label_b=pb) | {k: options.pop(k) for k in ("label_a", "label_b") if k in options}
    claims = []
    for over in overs:
        conds = CORRUPTIONS if over == "each" else [None]
        for c in conds:
            cond = c if over == "each" else list(CORRUPTIONS)
            if over in ("each", "mean-row"):
                keys = [(_rk(table, c or "mean", m, metric),) for m in (pa, pb)]
            elif over == "mean":
                keys = [tuple(_rk(table, x, m, metric) for x in CORRUPTIONS) for m in (pa, pb)]
            else:  # a paper setting without conditions
                keys, cond = [(_rk(table, over, m, metric),) for m in (pa, pb)], None
            suffix = {"each": f"_{c}", "mean": "_mean", "mean-row": "_mean" if len(overs) > 1 else ""}.get(over, "")
            where_c = {} if cond is None else dict(condition=cond)
            scope = f"under {c}" if over == "each" else ("mean over the four corruptions" if cond else "")
            claims.append(Claim(
                cid + suffix, "roda", f"{text} ({table}{', ' + scope if scope else ''})", kind, keys[0], keys[1],
                file, {column: oa, **where_c, **where}, {column: ob, **where_c, **where}, **labels, **options))
    return claims


def _roda_claims() -> list[Claim]:
    claims = [c for row in RODA_PAIRS for c in expand(row)]
    claims += [
        Claim("fig5b_gap_grows_with_severity", "roda",
              "RoDA's margin over PatchCore grows with Gaussian-noise severity (Fig. 5b)", "order", (), (), FIG5B_FILES,
              ((1, dict(method="roda", severity="max")), (-1, dict(method="patchcore", severity="max"))),
              ((1, dict(method="roda", severity="min")), (-1, dict(method="patchcore", severity="min"))),
              label_a="gap@max severity", label_b="gap@min severity", expect=1,
              figure_only="the text says the gap becomes more pronounced at higher noise levels"),
        Claim("fig5b_roda_vs_patchcore_max_severity", "roda",
              "RoDA beats PatchCore at the highest Gaussian-noise severity (Fig. 5b; Table 1 at severity 5)", "order",
              (_rk("Table 1", "gaussian_noise", "RoDA"),), (_rk("Table 1", "gaussian_noise", "PatchCore"),),
              FIG5B_FILES, dict(method="roda", severity="max"), dict(method="patchcore", severity="max"),
              label_a="RoDA", label_b="PatchCore"),
    ]
    # absolute values: only with WRN-50 on all 15 MVTec classes
    for cid, text, setting, method, file, where in (
            ("abs_patchcore_clean", "PatchCore clean image AUROC 98.81", "clean", "PatchCore", "02_patchcore",
             dict(condition="clean")),
            ("abs_patchcore_gaussian_noise", "PatchCore image AUROC under Gaussian noise 80.23", "gaussian_noise",
             "PatchCore", "02_patchcore", dict(condition="gaussian_noise", severity=PAPER_SEVERITY)),
            ("abs_roda_mean", "RoDA mean image AUROC over the four corruptions 91.34", "mean", "RoDA", RODA_GRID,
             dict(method="roda", condition=list(CORRUPTIONS), severity=PAPER_SEVERITY))):
        claims.append(Claim(cid, "roda", f"{text} (Table 1)", "absolute", (_rk("Table 1", setting, method),), (),
                            file, where, data_tasks=MVTEC_TASKS))
    return claims


#: DPDL: our task -> (paper dataset, category), from the registry; ``ksdd`` in 05_* files written before the
#: registry named the thirds ``ksdd_thirds`` means the thirds as well
DPDL_DATASETS = {name: spec.paper for name, spec in TASKS.items() if spec.paper and "openset" in spec.protocols}
DPDL_TASK_ALIASES = {"ksdd_thirds": ("ksdd_thirds", "ksdd")}
DPDL_BASELINES = {"devnet": "DevNet", "dra": "DRA", "flos": "FLOS"}
DPDL_FILES = {"general": "05_general_runs", "hard": "05_hard_runs"}  # columns: task, setting, seen_class,
# n_anomalies, seed, method (dpdl/devnet/dra/flos), auroc, test_normal, test_anomaly[, schedule "50x20x16"]
ABLATION_FILE = "05_ablation_runs"  # method: DPDL, w/o DPL, w/o DFL, M_r, M_n + M_r, M_a + M_r (general, largest M)
FULL_DPDL = ("DPDL", "dpdl")  # the full model in the ablation table: notebook 05 writes DPDL, run_dpdl.py dpdl
_T1 = ("MVTec", "Optical", "SDD", "AITEX", "ELPV", "Mastcam", "Hyper-Kvasir", "BrainMRI", "HeadCT")
_T2 = (("MVTec", "carpet"), ("MVTec", "metal_nut"), ("AITEX", None), ("ELPV", None), ("Mastcam", None),
       ("Hyper-Kvasir", None))
#: setting -> (paper table across datasets, its rows); M: the paper's 10 (ours: the largest run) and 1
DPDL_SETTINGS = {"general": ("Table 1", [(d, None) for d in _T1]), "hard": ("Table 2", list(_T2))}
DPDL_M = (10, 1)
#: Table 3 heads and Fig. 2 components: (our variant, paper row or None for figure-only)
DPDL_ABLATIONS = (("M_r", "M_r only"), ("M_n + M_r", "M_n + M_r"), ("M_a + M_r", "M_a + M_r"), ("w/o DPL", None),
                  ("w/o DFL", None))


def _dw(method, setting, m):
    return dict(method=method, setting=setting, n_anomalies="max" if m == 10 else 1)


def _dpdl_claims() -> list[Claim]:
    common = dict(paper_backbone="ResNet-18", metric="auroc")
    claims = []
    for (setting, (table, rows)), m, (ob, name) in itertools.product(DPDL_SETTINGS.items(), DPDL_M,
                                                                     DPDL_BASELINES.items()):
        ps = f"{setting} M={m}"
        claims.append(Claim(
            f"dpdl_vs_{ob}_{setting}_m{m}", "dpdl", f"DPDL beats {name} in the {setting} setting, M={m} ({table}, "
            "all its datasets)", "order", tuple(_rk(table, ps, "DPDL", dataset=d, category=c, paper="dpdl")
                                                for d, c in rows),
            tuple(_rk(table, ps, name, dataset=d, category=c, paper="dpdl") for d, c in rows), DPDL_FILES[setting],
            _dw("dpdl", setting, m), _dw(ob, setting, m), label_a="DPDL", label_b=name, expect=1,
            paper_data=f"{len(rows)} datasets of {table} (mean)",
            note=f"paper M={m}; ours takes {'the largest M run' if m == 10 else 'M=1'}", **common))
    for task, (dataset, category) in DPDL_DATASETS.items():
        place = dataset + (f"/{category}" if category else "")
        ours = dict(tasks=DPDL_TASK_ALIASES.get(task, (task,)), paper_data=place, **common)
        settings = [("general", "Table 5" if category else "Table 1")]
        settings += [("hard", "Table 2")] if (dataset, category) in _T2 else []
        for (setting, table), m in itertools.product(settings, DPDL_M):
            ps, file = f"{setting} M={m}", DPDL_FILES[setting]
            key = _rk(table, ps, "DPDL", dataset=dataset, category=category, paper="dpdl")
            for ob, name in (("devnet", "DevNet"), ("dra", "DRA")):
                claims.append(Claim(
                    f"dpdl_vs_{ob}_{setting}_m{m}_{slug(task)}", "dpdl", f"DPDL vs {name} on {place}, {ps} ({table})",
                    "order", (key,), (_rk(table, ps, name, dataset=dataset, category=category, paper="dpdl"),), file,
                    _dw("dpdl", setting, m), _dw(ob, setting, m), label_a="DPDL", label_b=name, **ours))
            claims.append(Claim(f"abs_dpdl_{setting}_m{m}_{slug(task)}", "dpdl", f"DPDL AUC on {place}, {ps} ({table})",
                                "absolute", (key,), (), file, _dw("dpdl", setting, m), paper_params={"n_anomalies": m},
                                **ours))
    heads = ("AITEX", "ELPV", "Mastcam")  # the paper's Table 3 mean
    for variant, row in DPDL_ABLATIONS:
        full, other = dict(method=list(FULL_DPDL), n_anomalies="max"), dict(method=variant, n_anomalies="max")
        if row is None:
            claims.append(Claim(f"fig2_full_vs_{slug(variant)}", "dpdl", f"DPDL beats DPDL {variant} (Fig. 2)", "order",
                                (), (), ABLATION_FILE, full, other, label_a="DPDL", label_b=variant, expect=1,
                                figure_only="removing either component gives a significant AUC decline", **common))
            continue
        claims.append(Claim(
            f"t3_full_vs_{slug(variant)}", "dpdl", f"all three heads beat {row} (general M=10, Table 3)", "order",
            tuple(_rk("Table 3", "general M=10", "M_n + M_a + M_r (DPDL)", dataset=d, paper="dpdl") for d in heads),
            tuple(_rk("Table 3", "general M=10", row, dataset=d, paper="dpdl") for d in heads), ABLATION_FILE,
            full, other, label_a="DPDL", label_b=row, paper_data="AITEX, ELPV, Mastcam (mean)", **common))
    return claims


RODA_CLAIMS: tuple[Claim, ...] = tuple(_roda_claims())
DPDL_CLAIMS: tuple[Claim, ...] = tuple(_dpdl_claims())
ALL_CLAIMS: tuple[Claim, ...] = RODA_CLAIMS + DPDL_CLAIMS
