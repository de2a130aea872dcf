"""Development comparison behind ``bn_init="matched"`` (docs/choices.md), on development data only.

For each task of the profile, each seed and each corruption at severity 5 (and clean): PatchCore scores with
the source BatchNorm statistics, with plain AdaBN (running statistics re-estimated on the unlabeled
adaptation split, :func:`lib.roda.bn_stats.reestimate_bn_stats`) and with training-referenced AdaBN
(:func:`lib.roda.bn_stats.match_bn_stats`). No alignment, no labels used to choose anything: the labels only
score the three states. The recorded runs were made on the ``smoke`` profile (the synthetic set) and the
``default`` profile (ELPV, capped) before any MVTec or KolektorSDD run of the matched statistics:

    python scripts/dev_bn_init.py smoke results/dev/bn_init_synthetic.csv 0,1
    python scripts/dev_bn_init.py default results/dev/bn_init_elpv.csv 0,1,2 2

Column ``nn`` (the recorded `results/dev/bn_init_*.csv` files predate it; `results/dev/bn_gate_*.csv` have it) is
the adaptation split's mean nearest-bank distance in that state (:func:`lib.roda.bn_stats.nearest_bank_distance`):
the signal of ``bn_init="gated"``, which keeps ``matched`` where its ``nn`` is below ``source``'s.
"""

import sys
import warnings
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import backbones, profiles  # noqa: E402
from lib.common.data import make_loader  # noqa: E402
from lib.common.utils import write_csv  # noqa: E402
from lib.experiments.roda_steps import dataset, evaluate, fit_or_load_bank, resolve_task, target_split  # noqa: E402
from lib.roda.adaptation import bn_state, restore_bn_state  # noqa: E402
from lib.roda.bn_stats import bn_input_moments, match_bn_stats, nearest_bank_distance, reestimate_bn_stats  # noqa: E402


def main(profile: str, out: str, seeds: str, threads: str = "1") -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(threads))
    cfg = profiles.get_profile(profile)
    extractor = backbones.load_backbone(cfg.backbone, weights=cfg.backbone_weights, device=cfg.device)
    rows = []
    for name in cfg["tasks"]:
        task = resolve_task(cfg, name)
        model, _ = fit_or_load_bank(cfg, task, extractor, seed=0)
        reference = bn_input_moments(model, make_loader(dataset(task, task.train), batch_size=16))
        for seed in (int(s) for s in seeds.split(",")):
            adapt_split, eval_split = target_split(task, 0.2, seed)
            for corruption in [None, *cfg["corruption"]["names"]]:
                source = bn_state(model.extractor)
                batches = list(make_loader(dataset(task, adapt_split, corruption, 5, seed), batch_size=16))
                for state in ("source", "adabn", "matched"):
                    if state == "adabn":
                        reestimate_bn_stats(model, batches)
                    elif state == "matched":
                        match_bn_stats(model, batches, reference)
                    nn = nearest_bank_distance(model, batches)
                    res = evaluate(model, task, eval_split, corruption, 5, seed)
                    restore_bn_state(model.extractor, source)
                    rows.append(dict(task=name, seed=seed, condition=corruption or "clean", state=state,
                                     image=res["image_auroc"], pixel=res.get("pixel_auroc"), nn=nn))
                    print(rows[-1], flush=True)
    write_csv(pd.DataFrame(rows), out)


if __name__ == "__main__":
    main(*sys.argv[1:])
