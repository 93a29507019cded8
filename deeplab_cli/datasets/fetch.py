"""Download and unpack datasets: the PASCAL VOC 2012 trainval archive.

The archive is downloaded with :func:`deeplab_cli.download.download` (resumable ``.part`` file, checksum
checked) and unpacked safely: every member is checked before anything is written, and an archive holding an
absolute path, a ``..`` escape, a link pointing outside the target folder, or a device/FIFO member is
refused as a whole. A marker file written last makes the command idempotent: a second run does nothing.
"""

from __future__ import annotations

import posixpath
import tarfile
from pathlib import Path

from deeplab_cli.errors import DeeplabError
from deeplab_cli.files import write_json

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
# Published by the VOC site / torchvision; no sha256 is published for this file, so md5 is checked.
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
MARKER = ".deeplab-extracted.json"


class UnsafeArchiveError(DeeplabError):
    """An archive member would escape the target folder or is not a plain file, folder or safe link."""


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` must not be extracted, or None when it is safe."""
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../"):
        return "path leaves the target folder"
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        return "device or FIFO member"
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith(("/", "\\")):
            return f"link to absolute path {target}"
        base = posixpath.dirname(normal) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, target))
        if resolved == ".." or resolved.startswith("../"):
            return f"link to {target} points outside the target folder"
    elif not (member.isfile() or member.isdir()):
        return "unsupported member type"
    return None


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract the tar ``archive`` into ``dest`` after checking every member; returns the member names.

    Raises :class:`UnsafeArchiveError` (nothing written) if any member is unsafe.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                problem = _member_problem(member)
                if problem:
                    raise UnsafeArchiveError(
                        f"refusing to extract {archive.name}: member {member.name!r}: {problem}"
                    )
            # tarfile's "data" filter repeats the checks (and drops set-uid bits) as a second line of defence
            try:
                tar.extractall(dest, members=members, filter="data")
            except tarfile.FilterError as exc:
                raise UnsafeArchiveError(f"refusing to extract {archive.name}: {exc}") from exc
    except (tarfile.TarError, OSError) as exc:
        raise DeeplabError(f"cannot extract {archive}: {exc}") from exc
    return [m.name for m in members]


def voc_marker(root: Path) -> Path:
    return Path(root) / MARKER


def fetch_voc(
    root: Path | str,
    url: str = VOC_URL,
    *,
    sha256: str | None = None,
    md5: str | None = VOC_MD5,
    keep_archive: bool = False,
    progress: bool = True,
) -> Path:
    """Download and unpack VOC 2012 trainval under ``root``; returns the ``VOC2012`` folder.

    Idempotent: when the marker file from a finished run exists and the folder is there, nothing is done.
    An interrupted download resumes from its ``.part`` file; an interrupted extraction is redone.
    """
    from deeplab_cli.download import download

    root = Path(root).expanduser()
    voc2012 = root / "VOCdevkit" / "VOC2012"
    marker = voc_marker(root)
    if marker.is_file() and (voc2012 / "JPEGImages").is_dir():
        return voc2012
    archive = root / VOC_ARCHIVE
    if not archive.is_file():
        download(url, archive, sha256=sha256, md5=md5 if not sha256 else None, progress=progress)
    names = safe_extract(archive, root)
    if not (voc2012 / "JPEGImages").is_dir():
        raise DeeplabError(
            f"{url} did not contain VOCdevkit/VOC2012/JPEGImages; is it the VOC 2012 trainval tar?"
        )
    write_json(marker, {"url": url, "archive": VOC_ARCHIVE, "members": len(names), "path": str(voc2012)})
    if not keep_archive:
        archive.unlink(missing_ok=True)
    return voc2012
