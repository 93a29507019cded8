"""Downloads with a progress bar, resume and checksum verification (http, https and file URLs)."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deeplab_cli.errors import DeeplabError

CHUNK = 1 << 20
USER_AGENT = "deeplab-cli (+https://pypi.org/project/deeplab-cli/)"


class DownloadError(DeeplabError):
    """A download failed or its checksum did not match."""


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def md5_of(path: Path) -> str:
    """The hex md5 of a file (only for checking upstream files published with an md5 sum)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _progress(total: int | None, description: str, enabled: bool) -> Iterator:
    """A rich progress bar on stderr when it is a terminal; a no-op callable otherwise."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda advance: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("[progress.description]{task.description}", *columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda advance: bar.update(task, advance=advance)


def _open(url: str, offset: int) -> tuple[object, int | None, bool]:
    """Open ``url`` from byte ``offset``; returns (stream, total size or None, whether the server resumed)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    response = urllib.request.urlopen(request, timeout=60)  # noqa: S310 (http, https and file only)
    resumed = offset > 0 and getattr(response, "status", 200) == 206
    length = response.headers.get("Content-Length")
    total = int(length) + (offset if resumed else 0) if length else None
    return response, total, resumed


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    resume: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` atomically and return ``dest``.

    Bytes go to ``dest.part`` first; an interrupted download resumes from it with a Range request when
    the server supports it. The checksum (sha256, else md5) is verified before the rename; on a mismatch
    the partial file is deleted and a :class:`DownloadError` says so.
    """
    if not url.startswith(("http://", "https://", "file://")):
        raise DownloadError(f"unsupported URL scheme: {url}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if resume and part.exists() else 0
    try:
        response, total, resumed = _open(url, offset)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"download of {url} failed: {reason}") from exc
    mode = "ab" if resumed else "wb"
    try:
        with response, open(part, mode) as out, _progress(total, dest.name, progress) as advance:
            if resumed:
                advance(offset)
            while block := response.read(CHUNK):
                out.write(block)
                advance(len(block))
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"download of {url} broke off ({exc}); run the command again to resume") from exc
    _verify(part, url, sha256=sha256, md5=md5)
    os.replace(part, dest)
    return dest


def _verify(part: Path, url: str, *, sha256: str | None, md5: str | None) -> None:
    """Check the downloaded bytes; delete them and raise when they do not match the expected checksum."""
    if sha256:
        actual, expected, kind = sha256_of(part), sha256.lower(), "sha256"
    elif md5:
        actual, expected, kind = md5_of(part), md5.lower(), "md5"
    else:
        return
    if actual != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch for {url}: expected {kind} {expected}, got {actual}; "
            "the partial file was deleted"
        )
