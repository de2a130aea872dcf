"""ELPV solar cells, the embedded default data: shipped on PyPI by the ``elpv-dataset`` package."""

from __future__ import annotations

from pathlib import Path

from lib.common.data import DataError, Sample


def elpv_root() -> Path:
    """Folder of the ELPV images installed by the ``elpv-dataset`` package."""
    import importlib.util

    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded default data is missing: pip install elpv-dataset==1.0.0.post1")
    return Path(spec.submodule_search_locations[0]) / "data"


def elpv_samples(uncertain: str = "drop") -> list[Sample]:
    """ELPV solar cells (Buerhop-Lutz et al. 2018; Deitsch et al. 2019), 300x300 gray, CC BY-NC-SA.

    Each cell carries a defect probability in {0, 1/3, 2/3, 1} and a cell type (mono, poly).
    As in DRA/DPDL: probability 0 is normal, probability 1 is anomalous with the cell type as the
    anomaly class (``mono``/``poly``). ``uncertain`` decides the 1/3 and 2/3 cells: ``"drop"`` (default),
    ``"normal"`` or ``"anomalous"``.
    """
    if uncertain not in ("drop", "normal", "anomalous"):
        raise DataError(f"uncertain must be 'drop', 'normal' or 'anomalous', got {uncertain!r}")
    root = elpv_root()
    samples = []
    for line in (root / "labels.csv").read_text().splitlines():
        if not line.strip():
            continue
        rel, prob, kind = line.split()
        prob = float(prob)
        if 0 < prob < 1:
            if uncertain == "drop":
                continue
            label = int(uncertain == "anomalous")
        else:
            label = int(prob == 1.0)
        samples.append(Sample(str(root / rel), label, kind if label else "good"))
    return sorted(samples, key=lambda s: s.path)
