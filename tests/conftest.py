"""Shared test fixtures: paths into ../shared and a weight cache that uses ../shared/weights as mirror.

Nothing is downloaded: DEEPLAB_MIRROR points at the shared weights, DEEPLAB_HOME at a per-session cache.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before any test module imports torch (see deeplab_cli)

# A shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored across exec:
# the commands the signal tests start would then never see their SIGINT. Handled here, it is back to
# the default in every child, as under a terminal or CI.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DEEPLAB_SHARED", REPO.parent / "shared")).resolve()
WEIGHTS_MIRROR = SHARED / "weights"
IMAGES = SHARED / "images"
VOC_ROOT = SHARED / "voc"  # holds VOC2012/
VOC2012 = VOC_ROOT / "VOC2012"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (a decompression bomb's shape), with tiny data."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def voc_sample_ids(n: int | None = None) -> list[str]:
    """The ids of the real VOC images present in ../shared (first ``n`` of them)."""
    ids = (VOC2012 / "ImageSets" / "Segmentation" / "sample.txt").read_text().split()
    return ids[:n] if n else ids


@pytest.fixture(scope="session", autouse=True)
def deeplab_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weight cache for the whole test session, filled from the shared mirror on first use.

    Set DEEPLAB_TEST_HOME to reuse a cache between local runs (CI always starts empty).
    """
    shared_base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared_base = shared_base.parent  # one cache for all xdist workers (conversion is atomic)
    home = Path(os.environ.get("DEEPLAB_TEST_HOME") or shared_base / "deeplab_home")
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DEEPLAB_HOME"] = str(home)
    os.environ["DEEPLAB_MIRROR"] = str(WEIGHTS_MIRROR)
    os.environ["DEEPLAB_OFFLINE"] = "1"
    _convert_shared_models()
    return home


# The models most tests run. Converting them before any test starts keeps the first-use notice
# ("converting ... once") out of the stderr that the CLI tests compare, whichever test runs first.
WARM_MODELS = ("deeplabv3-mnv2-dm05-voc", "deeplabv3-mnv2-voc")


def _convert_shared_models() -> None:
    from deeplab_cli import weights
    from deeplab_cli.zoo import get_model

    previous = weights.set_notice(None)
    try:
        for name in WARM_MODELS:
            weights.ensure_onnx(get_model(name))
    finally:
        weights.set_notice(previous)
