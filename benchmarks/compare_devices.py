"""Join two runs of the same RoDA grid on different devices (``scripts/run_roda_grid.py --out``), cell by
cell, with the AUROC differences: how far CUDA's numbers are from CPU's for the same seeds.

    python benchmarks/compare_devices.py CPU.csv CUDA.csv OUT.csv
"""

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.common.utils import write_csv

KEYS = ["task", "method", "condition", "severity", "seed"]


def main(cpu, cuda, out):
    a, b = pd.read_csv(cpu), pd.read_csv(cuda)
    both = a[KEYS + ["image_auroc", "pixel_auroc"]].merge(b[KEYS + ["image_auroc", "pixel_auroc"]], on=KEYS,
                                                         suffixes=("_cpu", "_cuda"), validate="one_to_one")
    for metric in ("image_auroc", "pixel_auroc"):
        both[f"{metric}_diff"] = both[f"{metric}_cuda"] - both[f"{metric}_cpu"]
        both[f"{metric}_absdiff"] = both[f"{metric}_diff"].abs()
    write_csv(both, out)
    print(both.round(4).to_string(), f"\n{len(both)} cells; mean |diff| image "
          f"{both['image_auroc_absdiff'].mean():.4f}, pixel {both['pixel_auroc_absdiff'].mean():.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
