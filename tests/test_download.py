"""lib.common.download on a tiny local fake MVTec archive (file:// URL or path); no network."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from lib.common.download import (
    MVTEC_AD_SHA256,
    MVTEC_AD_URL,
    MVTEC_CATEGORIES,
    ChecksumError,
    UnsafeArchiveError,
    download_file,
    download_mvtec,
    extract_archive,
    verify_checksum,
)

LAYOUT = {
    "license.txt": b"CC BY-NC-SA 4.0",
    "bottle/train/good/000.png": b"png-bottle-train",
    "bottle/test/good/000.png": b"png-bottle-test-good",
    "bottle/test/broken_large/000.png": b"png-bottle-test-defect",
    "bottle/ground_truth/broken_large/000_mask.png": b"png-bottle-mask",
    "cable/train/good/000.png": b"png-cable-train",
    "cable/test/good/000.png": b"png-cable-test",
}


def make_tar(path: Path, entries: dict, mode: str = "w:xz") -> str:
    """Write a tar with ``entries`` (name -> bytes, or a TarInfo for special members); return its sha256."""
    with tarfile.open(path, mode) as tar:
        for name, payload in entries.items():
            if isinstance(payload, tarfile.TarInfo):
                tar.addfile(payload)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def fake_archive(tmp_path):
    archive = tmp_path / "src" / "mvtec_anomaly_detection.tar.xz"
    archive.parent.mkdir()
    return archive, make_tar(archive, LAYOUT)


def test_constants():
    assert MVTEC_AD_URL.startswith("https://") and MVTEC_AD_URL.endswith("/mvtec_anomaly_detection.tar.xz")
    assert len(MVTEC_AD_SHA256) == 64 and int(MVTEC_AD_SHA256, 16) >= 0
    assert len(MVTEC_CATEGORIES) == 15


def test_verify_checksum(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * 3_000_000)  # several read chunks
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert verify_checksum(path, digest.upper()) == digest
    with pytest.raises(ChecksumError, match=f"expected {'0' * 64}, got {digest}"):
        verify_checksum(path, "0" * 64)


def test_download_mvtec_subset_then_more(tmp_path, fake_archive):
    archive, digest = fake_archive
    root = tmp_path / "mvtec"
    assert download_mvtec(root, ["bottle"], url=archive.as_uri(), sha256=digest, progress=False) == root
    assert files_under(root) == sorted(
        ["license.txt", "mvtec_anomaly_detection.tar.xz"] + [k for k in LAYOUT if k.startswith("bottle/")]
    )
    assert (root / "bottle/test/broken_large/000.png").read_bytes() == b"png-bottle-test-defect"
    assert not (root / "cable").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no staging leftovers

    # already present: a no-op that does not even look at the (now unreachable) URL
    stamp = (root / "bottle/train/good/000.png").stat().st_mtime_ns
    download_mvtec(root, ["bottle"], url=(tmp_path / "gone.tar.xz").as_uri(), sha256=digest, progress=False)
    assert (root / "bottle/train/good/000.png").stat().st_mtime_ns == stamp

    # more categories: the kept archive is verified and reused, only the missing category is extracted
    archive.unlink()
    download_mvtec(root, ["bottle", "cable"], url=archive.as_uri(), sha256=digest, progress=False)
    assert (root / "cable/test/good/000.png").read_bytes() == b"png-cable-test"
    assert (root / "bottle/train/good/000.png").stat().st_mtime_ns == stamp


def test_download_from_local_path_without_keeping(tmp_path, fake_archive):
    archive, digest = fake_archive
    root = tmp_path / "mvtec"
    download_mvtec(root, "cable", url=str(archive), sha256=digest, keep_archive=False, progress=False)
    assert files_under(root) == sorted(["license.txt"] + [k for k in LAYOUT if k.startswith("cable/")])
    with pytest.raises(ValueError, match="not in"):
        download_mvtec(tmp_path / "other", ["wood"], url=str(archive), sha256=digest, progress=False)


def test_checksum_mismatch_leaves_nothing(tmp_path, fake_archive):
    archive, _ = fake_archive
    root = tmp_path / "mvtec"
    with pytest.raises(ChecksumError, match="SHA-256 mismatch.*nothing was kept"):
        download_mvtec(root, ["bottle"], url=archive.as_uri(), sha256="ab" * 32, progress=False)
    assert files_under(root) == [] and list(root.iterdir()) == []
    # same through download_file directly
    with pytest.raises(ChecksumError):
        download_file(archive.as_uri(), tmp_path / "dl" / "a.tar.xz", sha256="ab" * 32, progress=False)
    assert list((tmp_path / "dl").iterdir()) == []


@pytest.mark.parametrize(
    "bad_name", ["../evil.txt", "bottle/../../evil.txt", "/tmp/evil_absolute.txt", "bottle/train/../../../evil.txt"]
)
def test_path_traversal_rejected(tmp_path, bad_name):
    archive = tmp_path / "bad.tar"
    # a harmless member first, so that rejection happens after something was already extracted
    make_tar(archive, {"bottle/train/good/000.png": b"ok", bad_name: b"evil"}, mode="w")
    dest = tmp_path / "out" / "mvtec"
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, dest)
    assert list(dest.iterdir()) == []
    assert not list(tmp_path.rglob("evil*"))


def test_links_rejected(tmp_path):
    link = tarfile.TarInfo("bottle/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    archive = tmp_path / "link.tar.gz"
    make_tar(archive, {"bottle/a.png": b"ok", "bottle/link": link}, mode="w:gz")
    with pytest.raises(UnsafeArchiveError, match="link"):
        extract_archive(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_extract_filter_and_clash(tmp_path, fake_archive):
    archive, _ = fake_archive
    dest = tmp_path / "out"
    added = extract_archive(archive, dest, lambda name: name.startswith("cable/"))
    assert added == ["cable"] and files_under(dest) == [k for k in sorted(LAYOUT) if k.startswith("cable/")]
    with pytest.raises(FileExistsError, match="remove them first"):
        extract_archive(archive, dest, lambda name: name.startswith("cable/"))
    assert sorted(p.name for p in dest.iterdir()) == ["cable"]
