"""Every folder and ``DEEPLAB_*`` setting the tool reads from the environment, in one place.

The lowest layer of the package: it imports nothing of ours, so the registry, the weight cache, the
datasets and the CRF tuner can all ask it where things live without importing one another.

- ``DEEPLAB_HOME``: the root of everything the tool keeps (default: the user cache dir, ~/.cache/deeplab).
- ``DEEPLAB_MIRROR``: folders (``os.pathsep`` list) searched for released weight files before downloading.
- ``DEEPLAB_OFFLINE``: never download (1/true/yes).
- ``DEEPLAB_DATA``: where datasets live (default ``<home>/data``).
- ``DEEPLAB_MAX_PIXELS``: the decoder's decompression-bomb guard (default 178,956,970, Pillow's limit).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MAX_PIXELS = 2 * 89_478_485


def home() -> Path:
    """The tool's root folder: ``$DEEPLAB_HOME``, else the platform's user cache dir."""
    if os.environ.get("DEEPLAB_HOME"):
        return Path(os.environ["DEEPLAB_HOME"]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("deeplab"))


def models_dir() -> Path:
    """Converted ONNX files and the records of user-imported models."""
    return home() / "models"


def sources_dir() -> Path:
    """Released weight files (downloaded, imported or copied from a mirror), as they were published."""
    return home() / "sources"


def locks_dir() -> Path:
    """Lock files that make conversion happen once when several processes ask at the same time."""
    return home() / "locks"


def crf_dir() -> Path:
    """Tuned CRF parameters (``<model>.json``) and the tuner's probability cache."""
    return home() / "crf"


def data_root() -> Path:
    """Where datasets live unless ``--data-root`` is given: ``$DEEPLAB_DATA``, else ``<home>/data``."""
    value = os.environ.get("DEEPLAB_DATA")
    return Path(value).expanduser() if value else home() / "data"


def mirror_dirs(extra: list[Path] | None = None) -> list[Path]:
    """Folders searched for released files before any download: ``extra``, then ``$DEEPLAB_MIRROR``."""
    dirs = list(extra or [])
    dirs += [Path(p).expanduser() for p in os.environ.get("DEEPLAB_MIRROR", "").split(os.pathsep) if p]
    return dirs


def offline() -> bool:
    """True when ``$DEEPLAB_OFFLINE`` forbids downloads."""
    return os.environ.get("DEEPLAB_OFFLINE", "").lower() not in ("", "0", "false", "no")


def max_pixels() -> int:
    """The decoder's pixel limit: ``$DEEPLAB_MAX_PIXELS``, else Pillow's own hard limit."""
    value = os.environ.get("DEEPLAB_MAX_PIXELS", "")
    return int(value) if value.strip().isdigit() else DEFAULT_MAX_PIXELS
