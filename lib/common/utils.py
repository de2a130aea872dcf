"""Seeding, devices, atomic writes and progress bars shared by every module and notebook."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) and select torch's deterministic kernels, so that a run
    is repeatable bit for bit.

    Seeds alone are not enough: on CPU the backward of advanced indexing (``target[rows]`` with repeated
    rows, as in the RoDA loss) accumulates with parallel atomic adds, whose order, and so the last bits of
    the gradient, changes from run to run with two or more threads (one pixel AUROC differed in the 7th
    digit). ``torch.use_deterministic_algorithms`` switches such ops to their sorted, ordered variants
    (``warn_only``: an op without one warns instead of failing).

    That switch also turns on ``torch.utils.deterministic.fill_uninitialized_memory``, a debugging aid that
    writes NaN into every ``torch.empty`` (and every output buffer) so that reads of uninitialised memory
    show up. It changes no result of code that reads only what it wrote, and it cost a third of a RoDA
    adaptation step (0.65 s of ``fill_`` in a 2.3 s step, 10 + 10 images at 224 px, 2 threads): it is
    switched off again here; the rerun tests (two runs, equal bits) guard what it would have guarded."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at CUDA start)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def all_finite(x: torch.Tensor) -> bool:
    """``torch.isfinite(x).all()`` in one reduction pass: ``aminmax`` propagates NaN and ``+-inf`` are the
    extremes, so both ends are finite exactly when every entry is. About 9x faster than ``isfinite`` on a
    15,680 x 2,500 cost (which builds three temporaries of that size). Empty tensors are finite."""
    if x.numel() == 0 or not x.is_floating_point():  # integers and bools are always finite
        return True
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


_SCRATCH: dict = {}


def scratch(name: str, shape, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """An uninitialised tensor of ``shape`` whose CPU memory is kept for the next call with the same ``name``.

    A fresh CPU tensor of the size of a RoDA cost matrix (15,680 x 2,500 float32, 157 MB) is mapped from the
    operating system on every allocation and freed back after it; touching its pages the first time costs
    about 40 ms on these cores, more than a pass of arithmetic over it. Buffers that live for one call only
    (the cost of one adaptation step, Sinkhorn's scratch) are therefore taken from here: the buffer of a
    name grows to the largest size asked for and is reused. The contents are overwritten by the next call
    with the same ``name``, so nothing taken from here may outlive the caller's call. On CUDA this is
    ``torch.empty`` (its caching allocator already reuses blocks)."""
    device = torch.device(device)
    shape = tuple(int(n) for n in shape)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    buf = _SCRATCH.get((name, dtype))
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop((name, dtype), None)  # free the smaller buffer before the larger one is mapped
        buf = _SCRATCH[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def stable_hash(*parts) -> int:
    """A 32-bit integer from ``parts`` that is the same in every process (unlike ``hash``)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@contextmanager
def numpy_seed(seed: int):
    """Run a block under ``np.random.seed(seed)`` and restore the global state afterwards.

    Needed because imagecorruptions draws from the *global* numpy generator.
    """
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else goes to ``torch.device``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def progress(iterable=None, **kwargs):
    """tqdm progress bar that degrades to plain text in papermill/CI logs."""
    import sys

    from tqdm.auto import tqdm

    # outside a terminal (papermill, CI logs) every refresh is stored: refresh rarely there
    kwargs.setdefault("mininterval", 2.0 if sys.stderr.isatty() else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


class OutputError(OSError):
    """An output folder or file that cannot be written; the message names the folder and the fix."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ensure_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it writable (a probe file is written and removed), so that a run
    fails at its start, not at its first table after hours of compute."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to the {what} {folder} ({exc.strerror or type(exc).__name__}): pass "
                          "out_dir= (scripts/run_notebooks.py --out-dir) a folder you can write to, or fix the "
                          "folder's permissions") from None
    return folder


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    Nothing half-written is ever left at ``path``: a crash leaves the old file (or none). The file gets the
    permissions of an ordinary new file (``0666`` less the user's umask), not ``mkstemp``'s private ``0600``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or type(exc).__name__}): make "
                          f"{path.parent} writable or choose another output folder (out_dir= / --out-dir)") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_timing_column(name) -> bool:
    """Wall-clock columns (``seconds``, ``*_seconds``): they differ between identical runs."""
    return str(name) == "seconds" or str(name).endswith("_seconds")


def timings_path(path) -> Path:
    """Where :func:`write_csv` keeps the timing columns of the table at ``path``: ``<stem>_timings.csv``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_timings{path.suffix}")


def write_csv(df, path) -> Path:
    """Write a pandas DataFrame atomically, without its timing columns.

    Result tables must be identical for identical settings and seeds, and wall-clock time never is: the
    columns named ``seconds`` or ``*_seconds`` go to ``<stem>_timings.csv`` beside the table, with the
    table's non-float columns (the row keys) to join them back."""
    timing = [c for c in df.columns if is_timing_column(c)]
    if timing:
        keys = [c for c in df.columns if c not in timing and df[c].dtype.kind not in "fc"]
        with atomic_path(timings_path(path)) as tmp:
            df[keys + timing].to_csv(tmp, index=False)
        df = df.drop(columns=timing)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def read_csv(path):
    """A table written by :func:`write_csv`, with its timing columns joined back when its
    ``<stem>_timings.csv`` still belongs to it (same rows, same keys, in order; otherwise without them).

    A resumed run that rewrites a table from what it read keeps the wall-clock times of its finished rows."""
    import pandas as pd

    df = pd.read_csv(path)
    tpath = timings_path(path)
    if not tpath.is_file():
        return df
    times = pd.read_csv(tpath)
    timing = [c for c in times.columns if is_timing_column(c) and c not in df.columns]
    keys = [c for c in times.columns if c in df.columns]
    if (not timing or len(times) != len(df) or not keys
            or not df[keys].astype(str).reset_index(drop=True).equals(times[keys].astype(str))):
        return df
    return pd.concat([df, times[timing]], axis=1)


def write_json(obj, path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return Path(path)


def save_figure(fig, path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically as PNG."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    return Path(path)


def torch_save(obj, path) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def torch_load_fields(path, fields: tuple[str, ...], check=None):
    """The values of ``fields`` in the dict saved at ``path`` by :func:`torch_save`, or ``None`` when the
    file cannot be read, lacks a field, or fails ``check(blob)`` (a corrupted or foreign file: the caller
    says what to do about it)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        values = tuple(blob[name] for name in fields)
        usable = check is None or bool(check(blob))
    except Exception:  # noqa: BLE001 - any failure here means the file is unusable
        return None
    return values if usable else None
