"""Caches keyed by what built them: a file is reused only when everything that determines its content is
unchanged.

A cache key is the SHA-256 of a canonical JSON of its parts (:func:`content_key`)::

    key = sha256(json({kind, data: [(path, bytes, mtime_ns, label, defect, mask, box) per file],
                       geometry, backbone: {name, layers, normalisation, weights digest}, settings...}))

The key is stored *inside* the cached file and compared on load (:func:`load`): another data root, another
file list, an edited image, another backbone or weights, or any other setting gives another key, and the file
is rebuilt, never silently reused. The file name stays stable (one file per task, backbone and seed), so
that a rebuilt cache replaces the stale one instead of piling up beside it.

Three uses:

- memory banks (:func:`lib.experiments.roda_steps.fit_or_load_bank`, the key in the bank's metadata);
- any tensor or dict on disk (:func:`cached`: e.g. source features of a PatchCore run);
- shifted images in memory (:class:`ImageCache`): a preprocessed, corrupted image is a function of the file,
  the geometry, the corruption, its severity and the seed, so every method of a run shares one copy instead
  of re-corrupting the same split (used by :func:`lib.experiments.roda_steps.dataset`; bounded by bytes, least recently
  used first out).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lib.common.utils import torch_load_fields, torch_save

CACHE_FORMAT = "repro-cache/2"  # 2: features from eval-mode BatchNorm (see BANK_FORMAT)


def _canonical(obj):
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def content_key(**parts) -> str:
    """Hex SHA-256 of the canonical JSON of ``parts`` (dict order does not matter, tuples equal lists)."""
    text = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_fingerprint(path) -> list:
    """``[absolute path, size in bytes, mtime in ns]`` (size and mtime ``None`` for a missing file)."""
    if path is None:
        return None
    path = Path(path).expanduser().absolute()
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def samples_fingerprint(samples) -> list:
    """Every sample's file (and mask) fingerprint with its label, defect class and crop box, in order."""
    return [[file_fingerprint(s.path), s.label, s.defect, file_fingerprint(s.mask), list(s.box or ())]
            for s in samples]


def tensor_digest(module: torch.nn.Module, skip=()) -> str:
    """SHA-256 of a module's state (parameters and buffers, names, shapes and values), leaving out the
    entries whose names start with one of ``skip``."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if any(name.startswith(prefix) for prefix in skip):
            continue
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


_UNUSED: weakref.WeakKeyDictionary[torch.nn.Module, tuple] = weakref.WeakKeyDictionary()


def unused_modules(extractor: torch.nn.Module, size: int = 224) -> tuple:
    """Names of the leaf modules that a forward pass of ``extractor`` never runs (e.g. the classifier of a
    network whose taps stop earlier), found once per extractor with forward hooks on a blank image."""
    if extractor not in _UNUSED:
        ran, hooks = set(), []
        for name, module in extractor.named_modules():
            if not list(module.children()):
                hooks.append(module.register_forward_hook(lambda m, i, o, name=name: ran.add(name)))
        modes = [(m, m.training) for m in extractor.modules()]  # per module: a BN may be in train mode alone
        try:
            extractor.eval()
            device = next(iter(extractor.parameters()), torch.empty(0)).device
            with torch.no_grad():
                extractor(torch.zeros(1, 3, size, size, device=device))
        finally:
            for m, training in modes:
                m.training = training
            for h in hooks:
                h.remove()
        leaves = ((n, m) for n, m in extractor.named_modules() if not list(m.children()))
        unused = (n for n, m in leaves if n not in ran and next(m.parameters(), None) is not None)
        _UNUSED[extractor] = tuple(sorted(unused))
    return _UNUSED[extractor]


def extractor_fingerprint(extractor) -> dict:
    """The backbone identity: name, taps, normalisation (with the weights id) and a digest of the weights the
    taps depend on.

    Modules a forward pass never runs are left out (:func:`unused_modules`): no feature depends on them, and
    a bundled network whose weights stop before its classifier gets a freshly (randomly) initialised one in
    every process."""
    out = dict(name=getattr(extractor, "name", type(extractor).__name__),
               layers=list(getattr(extractor, "layers", []) or []),
               normalization=getattr(extractor, "normalization", None))
    if isinstance(extractor, torch.nn.Module):
        out["weights"] = tensor_digest(extractor, skip=tuple(f"{n}." for n in unused_modules(extractor)))
    return out


class CacheMiss(Exception):
    """Why a cache file was not used (missing, unreadable, or built from other inputs)."""


def read(path, key: str):
    """The payload of the cache file ``path`` if it was built under ``key``; :class:`CacheMiss` with the
    reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CacheMiss(f"{path.name} does not exist")
    fields = torch_load_fields(path, ("cache_key", "payload"), check=lambda b: b.get("cache_format") == CACHE_FORMAT)
    if fields is None:
        raise CacheMiss(f"{path.name} is unreadable or not a cache file of format {CACHE_FORMAT}")
    stored, payload = fields
    if stored != key:
        raise CacheMiss(f"{path.name} was built from other data or settings (key {stored[:12]} != {key[:12]})")
    return payload


def write(payload, path, key: str) -> Path:
    """Write ``payload`` with its key (atomically, with the user's umask)."""
    return torch_save(dict(cache_format=CACHE_FORMAT, cache_key=key, payload=payload), path)


def load(path, key: str, on_miss: Callable[[str], None] | None = None):
    """:func:`read` that returns ``None`` on a miss (after telling ``on_miss`` why)."""
    try:
        return read(path, key)
    except CacheMiss as miss:
        if on_miss is not None:
            on_miss(str(miss))
        return None


def cached(path, key: str, build: Callable[[], object], use_cache: bool = True, on_miss=None):
    """``build()``'s result, from ``path`` when it was stored there under ``key``, else built and stored."""
    if use_cache:
        payload = load(path, key, on_miss)
        if payload is not None:
            return payload
    payload = build()
    write(payload, path, key)
    return payload


class ImageCache:
    """Preprocessed (and shifted) images in memory, keyed by content, at most ``max_bytes`` in all.

    ``get(key)`` returns the stored ``(image, mask)`` arrays (read-only views) or ``None``; ``put`` stores
    them, evicting the least recently used entries. Thread-safe."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, tuple] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, *arrays: np.ndarray) -> None:
        arrays = tuple(np.array(a, copy=True) for a in arrays)
        for a in arrays:
            a.setflags(write=False)
        size = sum(a.nbytes for a in arrays)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = arrays
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= sum(a.nbytes for a in old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


#: the process-wide cache of shifted images used by :func:`lib.experiments.roda_steps.dataset`
IMAGES = ImageCache()
