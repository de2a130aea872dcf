"""Download and extract the official MVTec AD archive (for users with internet; never run by default).

The default run of this project uses the embedded data sets and :mod:`lib.common.synthetic`; this module is
for reproducing the paper numbers on real MVTec AD. Only the standard library is used (``urllib``,
``hashlib``, ``tarfile``).

Where the archive comes from
    MVTec AD (Bergmann et al., CVPR 2019; licence CC BY-NC-SA 4.0) is distributed from
    https://www.mvtec.com/company/research/datasets/mvtec-ad (the download page asks you to accept the
    licence). The direct link of the full archive ``mvtec_anomaly_detection.tar.xz`` (5,264,982,680
    bytes) below is the one anomalib's MVTec data module uses, with the same SHA-256. MVTec's share links
    have changed before: if the download fails, take the current link from the MVTec download page and
    pass it as ``url`` (the checksum of the archive itself has not changed), or download it by hand and
    pass ``archive=``.

What :func:`download_mvtec` guarantees
    - The archive is streamed to ``<name>.part`` while its SHA-256 is computed, and renamed to its final
      name only when the digest matches; on a mismatch nothing is left behind.
    - Extraction rejects unsafe members (absolute paths, ``..``, links, devices) before writing them,
      writes only regular files and folders, keeps only the requested categories, and works in a hidden
      temporary folder that is moved into place only when the whole pass succeeded. An interrupted run
      therefore never leaves a half-extracted category.
    - Categories already present (``train/good`` and ``test`` folders) are not downloaded again; when all
      requested ones are present the call does nothing, without touching the network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import warnings
from pathlib import Path, PurePosixPath

from lib.common.registry import MVTEC_CATEGORIES

__all__ = [
    "ChecksumError",
    "MVTEC_AD_SHA256",
    "MVTEC_AD_SIZE",
    "MVTEC_AD_URL",
    "MVTEC_CATEGORIES",
    "UnsafeArchiveError",
    "download_file",
    "download_mvtec",
    "extract_archive",
    "sha256_file",
    "verify_checksum",
]

MVTEC_AD_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
    "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"
)
MVTEC_AD_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_AD_SIZE = 5_264_982_680
_TOP_LEVEL_FILES = ("license.txt", "readme.txt")
_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A file's SHA-256 is not the expected one."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the destination, or is a link or a device."""


# --------------------------------------------------------------------------------------- checksums


def sha256_file(path, chunk_size: int = _CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path, sha256: str) -> str:
    """Return the file's SHA-256 if it equals ``sha256`` (case-insensitive), else raise ChecksumError."""
    actual = sha256_file(path)
    expected = sha256.strip().lower()
    if actual != expected:
        raise ChecksumError(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual}. The file is corrupt, "
            "incomplete or a different version: delete it and download again"
        )
    return actual


# --------------------------------------------------------------------------------------- download


def _as_url(url_or_path) -> str:
    text = str(url_or_path)
    if "://" in text:
        return text
    return Path(text).expanduser().resolve().as_uri()


def download_file(url, dest, sha256: str | None = None, progress: bool = True, timeout: float = 60) -> Path:
    """Stream ``url`` (http(s)://, file:// or a local path) to ``dest``, checking SHA-256 on the fly.

    The data go to a temporary ``.part`` file next to ``dest``, renamed only when the digest matches
    (or ``sha256`` is None, which warns). On any failure the partial file is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if sha256 is None:
        warnings.warn(f"downloading {url} without a checksum", stacklevel=2)
    request = urllib.request.Request(_as_url(url), headers={"User-Agent": "roda-dpdl-repro (urllib)"})
    fd, part = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    digest = hashlib.sha256()
    bar = None
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            if progress:
                from lib.common.utils import progress as progress_bar

                bar = progress_bar(total=int(total) if total else None, unit="B", unit_scale=True,
                                   desc=dest.name)
            while block := response.read(_CHUNK):
                out.write(block)
                digest.update(block)
                if bar is not None:
                    bar.update(len(block))
        if sha256 is not None and digest.hexdigest() != sha256.strip().lower():
            raise ChecksumError(
                f"SHA-256 mismatch for {url}: expected {sha256.strip().lower()}, got {digest.hexdigest()}. "
                "The download is corrupt or the file changed; nothing was kept"
            )
        os.replace(part, dest)
        return dest
    finally:
        if bar is not None:
            bar.close()
        if os.path.exists(part):
            os.unlink(part)


# --------------------------------------------------------------------------------------- extraction


def _safe_parts(name: str) -> tuple[str, ...]:
    """Path components of a member name, or UnsafeArchiveError if it could escape the destination."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"archive member {name!r} has a NUL byte")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if any(p == ".." for p in parts) or any("\\" in p for p in parts) or (parts and ":" in parts[0]):
        raise UnsafeArchiveError(f"archive member {name!r} points outside the destination")
    return parts


def extract_archive(archive, dest, members_filter=None) -> list[str]:
    """Safely extract ``archive`` (any tar compression) into ``dest``; returns the top-level names added.

    ``members_filter(name) -> bool`` picks members by their normalised name (``"bottle/train/..."``);
    None keeps all. Every member is checked (whether kept or not): absolute paths, ``..``, symbolic or
    hard links and special files raise UnsafeArchiveError. Kept regular files and folders are written
    into a hidden temporary folder in ``dest``; only after the whole archive was read are its top-level
    entries moved into ``dest`` (files replace files; an existing folder of the same name is an error,
    checked before anything moves). On any error nothing is left in ``dest``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        # streaming mode: one sequential pass, which matters for a 5 GB .tar.xz
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                parts = _safe_parts(member.name)
                if member.issym() or member.islnk():
                    raise UnsafeArchiveError(f"archive member {member.name!r} is a link; links are not allowed")
                if not (member.isfile() or member.isdir()):
                    raise UnsafeArchiveError(f"archive member {member.name!r} is not a regular file or folder")
                if not parts:
                    continue
                name = "/".join(parts)
                if members_filter is not None and not members_filter(name):
                    continue
                target = staging.joinpath(*parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
        added = sorted(p.name for p in staging.iterdir())
        clashes = [n for n in added if (dest / n).is_dir() or ((dest / n).exists() and (staging / n).is_dir())]
        if clashes:
            raise FileExistsError(f"{dest} already has {', '.join(clashes)}: remove them first")
        for name in added:
            os.replace(staging / name, dest / name)
        return added
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------- MVTec


def _category_present(folder: Path) -> bool:
    good = folder / "train" / "good"
    return good.is_dir() and (folder / "test").is_dir() and any(good.iterdir())


def download_mvtec(
    root,
    categories=None,
    url: str = MVTEC_AD_URL,
    sha256: str | None = MVTEC_AD_SHA256,
    archive=None,
    keep_archive: bool = True,
    progress: bool = True,
) -> Path:
    """Make ``root/<category>`` exist for each requested MVTec AD category; returns ``root``.

    ``categories``: names (default all 15). ``url``: the archive (http(s)://, file:// or a local path).
    ``sha256``: its expected digest (None skips the check, with a warning). ``archive``: where the archive
    is or should be kept (default ``root/mvtec_anomaly_detection.tar.xz``); an existing one is verified
    and reused instead of downloading. ``keep_archive=False`` deletes an archive this call downloaded.
    Does nothing, and touches no network, when every requested category is already there.
    """
    root = Path(root)
    wanted = tuple(MVTEC_CATEGORIES if categories is None else ([categories] if isinstance(categories, str)
                                                                   else categories))
    missing = [c for c in wanted if not _category_present(root / c)]
    if not missing:
        return root
    name = Path(urllib.parse.urlparse(_as_url(url)).path).name or "mvtec_anomaly_detection.tar.xz"
    archive = Path(archive) if archive is not None else root / name
    downloaded = False
    if archive.exists():
        if sha256 is not None:
            verify_checksum(archive, sha256)
    else:
        download_file(url, archive, sha256=sha256, progress=progress)
        downloaded = True

    def keep(member: str) -> bool:
        return member.split("/", 1)[0] in missing or member.lower() in _TOP_LEVEL_FILES

    try:
        extract_archive(archive, root, keep)
    finally:
        if downloaded and not keep_archive:
            archive.unlink(missing_ok=True)
    absent = [c for c in missing if not _category_present(root / c)]
    if absent:
        raise ValueError(f"categories {absent} are not in {archive}; MVTec AD has {', '.join(MVTEC_CATEGORIES)}")
    return root
