"""Files in and out: image reading (any mode to RGB uint8, EXIF orientation, size limits), atomic writers.

Reading rules:
- EXIF orientation is applied (``ImageOps.exif_transpose``), so masks line up with what viewers show.
- Transparent images (LA, RGBA, PA, P with transparency) are composited on white: transparent pixels
  become white, as most viewers show them on a light background.
- 16-bit integer images (I;16*, I) are mapped to 8 bits as ``value / 257`` (0..65535 -> 0..255).
- Float images (F) are taken as 0..1 when their maximum is <= 1, else as 0..255; values are clipped.
- CMYK, YCbCr, LAB, HSV, 1-bit and palette images go through Pillow's conversion to RGB.
- Multi-frame files (GIF, TIFF) give their first frame.
- Images above :data:`MAX_PIXELS` pixels (width x height from the header, before decoding) are refused
  with an :class:`ImageError`, as are missing, empty, truncated and non-image files.

Every writer here is atomic: the data go to a hidden temporary file in the target folder, which then
replaces the target with ``os.replace``. A reader never sees a half-written output under its final name.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deeplab_cli import paths
from deeplab_cli.errors import ImageError, ImageTooLargeError

# Refuse images above this many pixels (Pillow's own hard limit, about 13k x 13k, i.e. 179 megapixels,
# which decode to 0.5 GB of RGB); $DEEPLAB_MAX_PIXELS overrides it (read once, at import).
MAX_PIXELS = paths.max_pixels()
TMP_SUFFIX = ".deeplab-tmp"

IMAGE_EXTENSIONS = frozenset(
    [
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".bmp",
        ".dib",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".jp2",
        ".j2k",
        ".jpx",
        ".psd",
        ".tga",
        ".ico",
        ".avif",
        ".qoi",
    ]
)


# ------------------------------------------------------------------------------------------- detection


def sniff_image(head: bytes) -> str | None:
    """The image format whose magic bytes start ``head`` (first 32 bytes of a file), or None."""
    signatures = (
        (b"\xff\xd8\xff", "jpeg"),
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"GIF87a", "gif"),
        (b"GIF89a", "gif"),
        (b"II*\x00", "tiff"),
        (b"MM\x00*", "tiff"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
        (b"\xffO\xffQ", "jpeg2000"),
        (b"8BPS", "psd"),
        (b"qoif", "qoi"),
    )
    for magic, name in signatures:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 14:
        return "bmp"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "pnm"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1"):
        return "heif"
    return None


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like an image by its content (magic bytes), whatever its name."""
    try:
        with open(path, "rb") as handle:
            return sniff_image(handle.read(32)) is not None
    except OSError:
        return False


def has_image_extension(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# ------------------------------------------------------------------------------------------- reading


def open_image(source: str | os.PathLike[str] | IO[bytes], max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image, with EXIF orientation applied; errors become :class:`ImageError`."""
    name = _name_of(source)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{name}: no such file")
        if path.is_dir():
            raise ImageError(f"{name}: is a folder, not an image")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open_header(source)
            width, height = image.size
            if width * height > limit:
                image.close()
                raise ImageTooLargeError(
                    f"{name}: image of {width}x{height} pixels exceeds the limit of {limit} pixels "
                    "(decompression-bomb guard; set DEEPLAB_MAX_PIXELS to raise it)"
                )
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason or isinstance(exc, EOFError):
            reason = f"truncated or corrupt image data ({reason})"
        raise ImageError(f"{name}: cannot decode image: {reason}") from None
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not make a readable image fail
        oriented = None
    return oriented if oriented is not None else image


_OPEN_LOCK = threading.Lock()


def _open_header(source: str | os.PathLike[str] | IO[bytes]) -> Image.Image:
    """``Image.open`` (reads the header only) with Pillow's own size check lifted, so that our limit,
    checked right after, decides and names the size. Under a lock: the check is a Pillow global.
    """
    with _OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow image as an H x W x 3 uint8 RGB array (rules in the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image).astype(np.float32)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        scale = 255.0 if values.size and float(values.max()) <= 1.0 else 1.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = mode in ("LA", "La", "RGBA", "RGBa", "PA") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_image(source: str | os.PathLike[str] | IO[bytes], max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as an H x W x 3 uint8 RGB array (EXIF-oriented); raises :class:`ImageError`."""
    image = open_image(source, max_pixels=max_pixels)
    try:
        return np.ascontiguousarray(to_rgb(image))
    except (OSError, ValueError) as exc:
        raise ImageError(f"{_name_of(source)}: cannot convert mode {image.mode} to RGB: {exc}") from None


def _name_of(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


# ------------------------------------------------------------------------------------------- writing


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], fsync: bool = False
) -> Path:
    """Write a file atomically: ``write(handle)`` fills a hidden temp file beside ``path``, then
    ``os.replace`` moves it into place. On any error the temp file is removed and the target untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a short random name, whatever the target's length: names of 234-255 bytes must work too
    fd, tmp_name = tempfile.mkstemp(prefix=".", suffix=TMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return target


_UMASK: int | None = None


def probe_folder(folder: str | os.PathLike[str]) -> None:
    """Create and remove a uniquely named temporary file in ``folder``; raises OSError when it cannot.

    Permission bits alone do not tell a read-only mount, an ACL or a path under a file; writing does.
    The name is unique, so shards of a job array may probe one folder at once.
    """
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".deeplab-probe-"):
        pass


def _umask() -> int:
    global _UMASK
    if _UMASK is None:
        current = os.umask(0)
        os.umask(current)
        _UMASK = current
    return _UMASK


def write_bytes(path: str | os.PathLike[str], data: bytes, fsync: bool = False) -> Path:
    return atomic_write(path, lambda handle: handle.write(data), fsync=fsync)


def copy_file(source: str | os.PathLike[str] | IO[bytes], path: str | os.PathLike[str]) -> Path:
    """Copy a file (or a readable binary stream) to ``path`` atomically."""
    if hasattr(source, "read"):
        return atomic_write(path, lambda handle: shutil.copyfileobj(source, handle))
    with open(source, "rb") as stream:
        return atomic_write(path, lambda handle: shutil.copyfileobj(stream, handle))


def write_label_png(
    path: str | os.PathLike[str], labels: np.ndarray, palette: str | np.ndarray | None, fsync: bool = False
) -> Path:
    """A label map as a palette PNG (values = class indices); 16-bit greyscale above 256 classes."""
    return write_bytes(path, encode_label_png(labels, palette), fsync=fsync)


# The text chunk every label mask carries, so that a later run recognises the masks it wrote (and never
# segments them as photos); ``deeplab_cli.batch.marks`` reads it back.
MASK_TAG = ("Software", "deeplab-cli")


def encode_label_png(labels: np.ndarray, palette: str | np.ndarray | None) -> bytes:
    """A label map as PNG bytes (palette PNG, or 16-bit greyscale above 256 classes), tagged as ours."""
    from PIL import PngImagePlugin

    from deeplab_cli.palette import label_image

    info = PngImagePlugin.PngInfo()
    info.add_text(*MASK_TAG)
    buffer = io.BytesIO()
    label_image(labels, palette).save(buffer, format="PNG", compress_level=1, pnginfo=info)
    return buffer.getvalue()


def write_image(
    path: str | os.PathLike[str], rgb: np.ndarray, quality: int = 90, fsync: bool = False
) -> Path:
    """An RGB uint8 array as JPEG (``.jpg``/``.jpeg``) or PNG (any other suffix)."""
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    suffix = Path(path).suffix.lower()

    def write(handle: IO[bytes]) -> None:
        if suffix in (".jpg", ".jpeg"):
            image.save(handle, format="JPEG", quality=quality)
        else:
            image.save(handle, format="PNG", compress_level=1)

    return atomic_write(path, write, fsync=fsync)


def write_npy(path: str | os.PathLike[str], array: np.ndarray, fsync: bool = False) -> Path:
    return atomic_write(path, lambda handle: np.save(handle, array), fsync=fsync)


def write_npz(
    path: str | os.PathLike[str], arrays: dict[str, np.ndarray], compressed: bool = True, fsync: bool = False
) -> Path:
    save = np.savez_compressed if compressed else np.savez
    return atomic_write(path, lambda handle: save(handle, **arrays), fsync=fsync)


def write_json(path: str | os.PathLike[str], data: Any, fsync: bool = False) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)
