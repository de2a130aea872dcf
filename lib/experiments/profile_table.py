"""The run profiles as data: ``_BASE`` (every setting's default) and what each profile changes.

:mod:`lib.experiments.profiles` resolves them (merge, ``--set`` overrides, checks against
:mod:`lib.experiments.settings`) into the read-only configuration a notebook or runner receives; this module is
the one place a default lives. A profile's purpose and cost are in the table of :mod:`lib.experiments.profiles`.
"""

from __future__ import annotations

import copy

from lib.common.data import SHARED_DATA
from lib.common.registry import MVTEC_CATEGORIES, TABLE4_ABLATION, TABLE4_ROWS
from lib.common.registry import PAPER_CORRUPTIONS as CORRUPTIONS
from lib.experiments.settings import merge_settings as _merge

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

#: RoDA Table 4 (the ablation of the alignment loss), row -> spec (the rows, their paper labels and grid names:
#: ``registry.TABLE4_ROWS``): notebook 04 runs every row; the RoDA grid runs the rows it does not already hold as
#: ``TABLE4_VARIANTS`` (its ``patchcore`` is "no alignment", its ``roda``, with the profile's ``flip_rot90``
#: augmentation, is "OT + discrete + data augment.")
TABLE4 = {
    "no_alignment": dict(method="patchcore"),
    "kl": dict(method="ttac", augment="none"),
    "moment_matching": dict(method="ttt++", augment="none"),
    "ot_hungarian": dict(method="hungarian", augment="none"),
    "ot_continuous": dict(method="continuous_ot", augment="none"),
    "ot_discrete": dict(method="roda", augment="none"),
    "ot_discrete_copy": dict(method="roda", augment="copy"),
    "ot_discrete_augment": dict(method="roda", augment="flip_rot90"),
}
TABLE4_VARIANTS = {TABLE4_ROWS[row][1]: spec for row, spec in TABLE4.items() if TABLE4_ROWS[row][1] in TABLE4_ABLATION}

#: notebook 08's diagnosis: each controlled change away from the paper-literal ``roda`` (the profile's eps 0.05 x
#: mean cost, uniform marginals, Eq. 6 "or", every batch, all epochs), one at a time
#: (``ablation.diagnosis.variants``; the names are the rows of its tables)
DIAGNOSIS_VARIANTS = {
    "roda": dict(method="roda"),
    "L1_eps_plan_spread": dict(method="roda", loss=dict(eps="auto", entries_per_row=8)),
    "L2_rule_mutual": dict(method="roda", loss=dict(rule="and")),
    "L2_rule_mass": dict(method="roda", loss=dict(rule="mass")),
    "L3_coverage_marginal": dict(method="roda", loss=dict(weights="coverage")),
    "L4_drop_last": dict(method="roda", drop_last=True),
    "L5_stop_rule": dict(method="roda", stop=dict(rel_tol=0.01, min_epochs=2)),
    "L6_semi_relaxed": dict(method="roda", loss=dict(eps="auto", entries_per_row=8, ot="semi_relaxed", rho="auto")),
}


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
              # what the paper's baselines need, applied before a variant's own options: the TTT++ code's
              # normalisation of Eq. 3 (CORAL scaling 1/(4 d^2), mean over dims); TTAC's Gaussian KL is ~10^3-10^4
              # on 256-d features, so it is divided by its first value
              method_defaults={"ttt++": dict(loss=dict(coral_scaling=True, mean_reduction="mean")),
                               "ttac": dict(normalize_loss=True)},
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
                                 curve_epochs=None, bank_seed=0, variants=DIAGNOSIS_VARIANTS)),
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
    # notebook 07: the simulated drifting line (lib.experiments.drifting_line): a ramp 0 -> 5 -> 0 of severities,
    # batches_per_window batches of batch_size images (half anomalous) per severity window; seeds None: the
    # profile's seeds
    stream=dict(severities=(0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0), batches_per_window=2, batch_size=8,
                one_shot_batches=2, one_shot_epochs=5, seeds=None, corruption="gaussian_noise", method="roda",
                steps_per_batch=1, source_check=1,
                guard=dict(warmup=1, hold_ratio=1.5, patience=3, collapse_ratio=0.5, momentum=0.8),
                strategies=("none", "one_shot", "stream", "stream_unguarded")),
)

# ELPV at a larger scale than the default profile (hours on 2 cores: its renders took 41 min for notebook 04
# and 31 min for 05): 3 seeds for the RoDA ablations, 5 for DPDL, every named RoDA variant;
# its tables are the ELPV tables docs/results_roda.md and docs/results_dpdl.md discuss
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


# every real category, 3-5 seeds and every named variant: a night on 2 cores (its tables are results/real_full/,
# most of them from the resumable scripts)
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
    stream=dict(seeds=(0, 1, 2)),
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
        stream=dict(severities=(0, 3, 5, 3, 0), batches_per_window=1, batch_size=4, one_shot_batches=1,
                    one_shot_epochs=2),
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
    # the papers' schedules on real data in about 2 hours on 2 CPU cores: `real_full` on one MVTec category
    # (bottle, the smallest), five of the named variants, DPDL with 3 seeds, notebook 08 on two corruptions
    "real": _merge(_REAL_FULL, dict(
        tasks=("mvtec/bottle",),
        roda=dict(variants={k: _BASE["roda"]["variants"][k] for k in
                            ("adabn_matched", "roda_slow", "roda_robust", "roda_robust_matched_slow",
                             "roda_robust_gated_slow")}),
        ablation=dict(diagnosis=dict(corruptions=("gaussian_noise", "brightness"), seeds=(0,),
                                     curve_corruptions=("gaussian_noise",))),
        dpdl=dict(tasks=("mvtec/bottle",), seeds=(0, 1, 2), hard_n_anomalies=(10,), hard_seeds=(0,),
                  ablation_seeds=(0, 1, 2), sensitivity_seeds=(0,)),
        stream=dict(seeds=(0,)))),
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
        stream=dict(seeds=(0, 1, 2)),
    ),
}
