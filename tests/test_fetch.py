"""``deeplab data fetch voc`` on a small VOC-layout tar built here, served from loopback HTTP or file://."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, VOC2012, voc_sample_ids
from loopback_http import serve_folder

from deeplab_cli.datasets import open_dataset
from deeplab_cli.datasets.fetch import MARKER, VOC_ARCHIVE, UnsafeArchiveError, fetch_voc, safe_extract
from deeplab_cli.download import DownloadError


@pytest.fixture(scope="module")
def voc_tar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tar with the official layout (VOCdevkit/VOC2012/...) holding 3 real sample images; its sha256."""
    folder = tmp_path_factory.mktemp("tar")
    archive = folder / VOC_ARCHIVE
    ids = voc_sample_ids(3)
    with tarfile.open(archive, "w") as tar:
        for i in ids:
            tar.add(VOC2012 / "JPEGImages" / f"{i}.jpg", f"VOCdevkit/VOC2012/JPEGImages/{i}.jpg")
            tar.add(
                VOC2012 / "SegmentationClass" / f"{i}.png", f"VOCdevkit/VOC2012/SegmentationClass/{i}.png"
            )
        listing = ("\n".join(ids) + "\n").encode()
        info = tarfile.TarInfo("VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt")
        info.size = len(listing)
        tar.addfile(info, io.BytesIO(listing))
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


REQUESTS: list[list[str]] = []  # the Range headers the current server has seen


@pytest.fixture()
def server(voc_tar: tuple[Path, str]) -> Iterator[str]:
    with serve_folder(voc_tar[0].parent) as (url, ranges):
        REQUESTS[:] = [ranges]
        yield f"{url}/{VOC_ARCHIVE}"


def test_fetch_over_http_then_idempotent(tmp_path: Path, server: str, voc_tar: tuple[Path, str]):
    root = tmp_path / "data"
    folder = fetch_voc(root, server, sha256=voc_tar[1], progress=False)
    assert folder == root / "VOCdevkit" / "VOC2012"
    assert (root / MARKER).is_file()
    assert not (root / VOC_ARCHIVE).exists()  # archive removed after unpacking
    dataset = open_dataset("voc", root, "val")
    assert [s.id for s in dataset.samples] == voc_sample_ids(3)
    first = next(iter(dataset)).label
    assert first.shape == (281, 500)
    assert REQUESTS[0] == [""]
    fetch_voc(root, server, sha256=voc_tar[1], progress=False)
    assert REQUESTS[0] == [""]  # second run: nothing downloaded


def test_fetch_resumes_a_partial_download(tmp_path: Path, server: str, voc_tar: tuple[Path, str]):
    root = tmp_path / "data"
    root.mkdir()
    data = voc_tar[0].read_bytes()
    (root / f"{VOC_ARCHIVE}.part").write_bytes(data[: len(data) // 2])
    fetch_voc(root, server, sha256=voc_tar[1], progress=False)
    assert REQUESTS[0] == [f"bytes={len(data) // 2}-"]
    assert len(open_dataset("voc", root, "val")) == 3


def test_fetch_from_file_url_and_bad_checksum(tmp_path: Path, voc_tar: tuple[Path, str]):
    url = voc_tar[0].as_uri()
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch_voc(tmp_path / "bad", url, sha256="0" * 64, progress=False)
    assert not (tmp_path / "bad" / "VOCdevkit").exists()
    assert not (tmp_path / "bad" / f"{VOC_ARCHIVE}.part").exists()
    md5 = hashlib.md5(voc_tar[0].read_bytes()).hexdigest()
    folder = fetch_voc(tmp_path / "good", url, md5=md5, keep_archive=True, progress=False)
    assert (folder / "JPEGImages").is_dir() and (tmp_path / "good" / VOC_ARCHIVE).is_file()


def _tar_with(path: Path, member: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("VOCdevkit/VOC2012/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 1
    return info


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_file("../escape.txt"), "leaves the target"),
        (_file("VOCdevkit/../../escape.txt"), "leaves the target"),
        (_file("/tmp/absolute.txt"), "absolute path"),
        (_link("VOCdevkit/etc", "/etc", tarfile.SYMTYPE), "absolute"),
        (_link("VOCdevkit/up", "../../..", tarfile.SYMTYPE), "outside"),
        (_link("VOCdevkit/hard", "../outside", tarfile.LNKTYPE), "outside"),
        (_device("VOCdevkit/null"), "device"),
    ],
)
def test_malicious_members_are_refused(tmp_path: Path, member: tarfile.TarInfo, reason: str):
    archive = _tar_with(tmp_path / "evil.tar", member)
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match=reason):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []  # checked before anything is written
    assert not (tmp_path / "escape.txt").exists()


def test_malicious_archive_through_fetch(tmp_path: Path):
    archive = _tar_with(tmp_path / "evil.tar", _link("VOCdevkit/etc", "/etc", tarfile.SYMTYPE))
    with pytest.raises(UnsafeArchiveError, match="VOCdevkit/etc"):
        fetch_voc(tmp_path / "root", archive.as_uri(), md5=None, progress=False)
    assert not (tmp_path / "root" / MARKER).exists()


def test_cli_data_fetch(tmp_path: Path, voc_tar: tuple[Path, str]):
    env = {**os.environ, "DEEPLAB_DATA": str(tmp_path / "data")}
    command = [
        sys.executable,
        "-m",
        "deeplab_cli",
        "data",
        "fetch",
        "voc",
        "-q",
        "--url",
        voc_tar[0].as_uri(),
    ]
    done = subprocess.run(
        [*command, "--sha256", voc_tar[1]], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == tmp_path / "data" / "VOCdevkit" / "VOC2012"
    assert (tmp_path / "data" / MARKER).is_file()
    bad = subprocess.run(
        [*command, "--root", str(tmp_path / "other"), "--sha256", "f" * 64],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 1 and "deeplab: error: checksum mismatch" in bad.stderr
