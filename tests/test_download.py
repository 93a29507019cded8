"""Downloads: file and loopback HTTP URLs, resume with Range, checksum verification, clear failures."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback_http import serve_folder

from deeplab_cli.download import DownloadError, download, sha256_of

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    root = tmp_path / "served"
    root.mkdir()
    with serve_folder(root) as (url, ranges):
        yield url, root, ranges


def test_file_url_with_checksum(tmp_path: Path) -> None:
    source = tmp_path / "model.bin"
    source.write_bytes(PAYLOAD)
    dest = download(
        source.as_uri(), tmp_path / "out" / "model.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest()
    )
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "out" / "model.bin.part").exists()


def test_http_download_resumes_from_partial_file(server: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    url, root, ranges = server
    (root / "model.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "model.bin"
    dest.with_name("model.bin.part").write_bytes(PAYLOAD[:1000])
    download(f"{url}/model.bin", dest, sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert ranges == ["bytes=1000-"]


def test_checksum_mismatch_deletes_partial_file(server: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    url, root, _ = server
    (root / "model.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "model.bin"
    with pytest.raises(DownloadError, match="checksum mismatch.*partial file was deleted"):
        download(f"{url}/model.bin", dest, sha256="0" * 64, progress=False)
    assert not dest.exists()
    assert not dest.with_name("model.bin.part").exists()


def test_failed_download_names_the_url(server: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    url, _, _ = server
    with pytest.raises(DownloadError, match=f"{url}/missing.bin"):
        download(f"{url}/missing.bin", tmp_path / "x.bin", progress=False)
    assert not (tmp_path / "x.bin").exists()


def test_unsupported_scheme(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="unsupported URL scheme"):
        download("ftp://example.invalid/x", tmp_path / "x")


def test_sha256_of(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(PAYLOAD)
    assert sha256_of(path) == hashlib.sha256(PAYLOAD).hexdigest()
