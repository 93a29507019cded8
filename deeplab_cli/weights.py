"""The weight cache: released files in, converted ONNX models out.

Layout under ``paths.home()`` (``$DEEPLAB_HOME``, else the user cache dir, e.g. ``~/.cache/deeplab``)::

    sources/<released file>          the upstream file, checked against its sha256
    sources/<model>--<member>        the weight file of a release archive (extracted, or imported bare)
    models/<name>.onnx               the converted model (spec embedded as ONNX metadata)
    models/<name>.onnx.json          what it was converted from, and the ONNX file's size and sha256
    models/<name>.json               the registry row of a model the user imported with --arch (zoo reads it)

A released file is looked for in the cache, then in the mirror folders (``--mirror`` or
``$DEEPLAB_MIRROR``, searched recursively by file name; for a release archive, by the archive's name or
its weight file's), then downloaded from its upstream URL unless ``$DEEPLAB_OFFLINE`` is set. Conversion
happens once, under a file lock, through :func:`deeplab_cli.export.convert_to_onnx`, written atomically.
A cached ONNX whose size differs from its record (a truncated copy) is converted again on next use;
``deeplab weights fetch`` also checks its sha256.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from deeplab_cli import paths
from deeplab_cli.download import DownloadError, download, sha256_of
from deeplab_cli.errors import DeeplabError, UsageError, WeightsError
from deeplab_cli.files import copy_file, write_json
from deeplab_cli.zoo import (
    ModelSpec,
    Source,
    find_by_sha256,
    get_model,
    registry_models,
    user_record_path,
)

# Bump when conversion changes in a way that makes cached ONNX files stale.
CONVERTER_VERSION = 3
FORMAT_BY_SUFFIX = {".tflite": "tflite", ".caffemodel": "caffe"}
# Architectures without a registry row of their own borrow the input convention of a sibling's row.
TEMPLATE_FOR_ARCH = {"deeplab-v2-vgg16": "deeplab-v1-largefov"}
# Rough conversion cost (seconds = BASE + per MB of weights), for the "converting ..." notice: measured
# on 2 shared cores, TFLite models take 4-5 s for 2-3 MB (their graphs are rebuilt op by op).
CONVERT_BASE_S = 2.0
CONVERT_S_PER_MB = {"tflite": 1.2, "caffe": 0.15}
_CACHE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)

Notice = Callable[[str], None]


class CacheWriteError(WeightsError):
    """The cache folder refused a write (read-only, no permission, disk full)."""


def _print_notice(message: str) -> None:
    print(f"deeplab: {message}", file=sys.stderr, flush=True)


_notice: Notice | None = _print_notice


def set_notice(notice: Notice | None) -> Notice | None:
    """Send the cache's notices (a first-use conversion and how long it took) to ``notice``.

    ``None`` silences them (``--quiet``); the default prints one line each to stderr, so that a first run
    says why it pauses. Returns the previous hook so that callers can restore it.
    """
    global _notice
    previous, _notice = _notice, notice
    return previous


def _say(message: str) -> None:
    if _notice is not None:
        _notice(message)


def onnx_path(spec: ModelSpec) -> Path:
    return paths.models_dir() / f"{spec.name}.onnx"


def is_ready(spec: ModelSpec) -> bool:
    """Whether the converted model is in the cache, complete and up to date."""
    return _cached_record(spec) is not None


@contextmanager
def _cache_writes() -> Iterator[None]:
    """Turn a refused write under the cache folder into one line that names ``DEEPLAB_HOME``."""
    try:
        yield
    except OSError as exc:
        home = Path(os.path.abspath(paths.home()))
        target = Path(os.path.abspath(exc.filename)) if exc.filename else None
        # the cache, a file in it, or a parent folder being created for it
        ours = target is not None and (target == home or home in target.parents or target in home.parents)
        if exc.errno not in _CACHE_ERRNOS or not ours:
            raise
        raise CacheWriteError(
            f"cannot write to the weight cache {home} ({exc.strerror}); free some space or make it "
            "writable, or set DEEPLAB_HOME to a writable folder"
        ) from exc


# ------------------------------------------------------------------------------------------- locating


def member_path(spec: ModelSpec) -> Path | None:
    """Where the weight file of a release archive is kept; ``None`` when the release is a single file.

    Named after the model because members of different releases share names (``train_iter_20000``).
    """
    member = spec.source.archive_member if spec.source else None
    return paths.sources_dir() / f"{spec.name}--{Path(member).name}" if member else None


def source_path(
    spec: ModelSpec, *, mirrors: list[Path] | None = None, allow_download: bool = True, progress: bool = True
) -> Path:
    """The released file of ``spec`` (or its archive's weight file): cache, mirror, or upstream URL."""
    source = _require_source(spec)
    cached = _in_cache(spec, source)
    if cached is not None:
        return cached
    found = _find_in_mirrors(spec, source, paths.mirror_dirs(mirrors))
    if found is not None:
        with _cache_writes():
            return copy_file(found, _cache_place(spec, found))
    names = source.file + (f" (or {Path(source.archive_member).name})" if source.archive_member else "")
    if not allow_download or paths.offline():
        raise WeightsError(
            f"{names} for model {spec.name!r} is not in the cache or a mirror and downloads are off; "
            f"get it from {source.url or 'its upstream release'} and run: deeplab weights import FILE"
        )
    with _cache_writes():
        return _download_source(spec, source, paths.sources_dir() / source.file, progress)


def _require_source(spec: ModelSpec) -> Source:
    if spec.source is None:
        raise WeightsError(f"model {spec.name!r} has no source file recorded")
    return spec.source


def _checksum_ok(path: Path, source: Source) -> bool:
    return source.sha256 is None or sha256_of(path) == source.sha256


def _in_cache(spec: ModelSpec, source: Source) -> Path | None:
    """The archive's weight file when present (no checksum is recorded for members), else the release."""
    member = member_path(spec)
    if member is not None and member.is_file():
        return member
    released = paths.sources_dir() / source.file
    return released if released.is_file() and _checksum_ok(released, source) else None


def _find_in_mirrors(spec: ModelSpec, source: Source, mirrors: list[Path]) -> Path | None:
    """The first file under a mirror named like the release (checksum verified) or like its member."""
    names = [source.file] + ([Path(source.archive_member).name] if source.archive_member else [])
    for mirror in mirrors:
        if not mirror.is_dir():
            continue
        for name in names:
            for candidate in sorted(mirror.rglob(name)):
                if candidate.is_file() and (name != source.file or _checksum_ok(candidate, source)):
                    return candidate
    return None


def _cache_place(spec: ModelSpec, found: Path) -> Path:
    """Where a file found for ``spec`` is kept: under the release's name, or as the archive's member."""
    member = member_path(spec)
    if member is not None and not zipfile.is_zipfile(found):
        return member
    return paths.sources_dir() / _require_source(spec).file


def _download_source(spec: ModelSpec, source: Source, dest: Path, progress: bool) -> Path:
    if not source.url:
        raise WeightsError(
            f"model {spec.name!r} has no download URL; import its file with: deeplab weights import FILE"
        )
    try:
        return download(source.url, dest, sha256=source.sha256, progress=progress)
    except DownloadError as exc:
        hint = "to install it by hand, download the file and run: deeplab weights import FILE"
        raise WeightsError(f"{exc}; {hint}") from exc


# ------------------------------------------------------------------------------------------- converting


def ensure_onnx(
    spec: ModelSpec | str | None,
    *,
    mirrors: list[Path] | None = None,
    allow_download: bool = True,
    progress: bool = True,
    verify: bool = False,
) -> Path:
    """The cached ONNX model for ``spec``, converting it on first use (and saying so, see set_notice).

    A cached file that does not match its record (truncated, or with ``verify`` a different sha256) is
    converted again from the released file.
    """
    if not isinstance(spec, ModelSpec):
        spec = get_model(spec)
    if _cached_record(spec, verify) is not None:
        return onnx_path(spec)
    with _cache_writes(), _lock(spec.name):
        if _cached_record(spec, verify) is not None:  # converted by another process meanwhile
            return onnx_path(spec)
        source = source_path(spec, mirrors=mirrors, allow_download=allow_download, progress=progress)
        return _convert(spec, _weight_file(spec, source))


def _estimate_s(spec: ModelSpec, weight_file: Path) -> int:
    size_mb = weight_file.stat().st_size / 1e6
    per_mb = CONVERT_S_PER_MB.get(spec.source.format if spec.source else "", 0.5)
    return max(1, round(CONVERT_BASE_S + per_mb * size_mb))


def _convert(spec: ModelSpec, weight_file: Path) -> Path:
    """Convert ``weight_file`` into the cache's ONNX for ``spec`` and record what it came from."""
    from deeplab_cli.export import convert_to_onnx

    _say(f"converting {spec.name} to ONNX (once; about {_estimate_s(spec, weight_file)} s)...")
    started = time.perf_counter()
    target = onnx_path(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    convert_to_onnx(weight_file, spec, target)
    record = {
        "source_sha256": sha256_of(weight_file),
        "converter": CONVERTER_VERSION,
        "onnx_size": target.stat().st_size,
        "onnx_sha256": sha256_of(target),
        "spec": json.loads(spec.to_json()),
    }
    write_json(_record_path(spec), record)
    _say(f"done in {time.perf_counter() - started:.1f} s")
    return target


def _weight_file(spec: ModelSpec, source: Path) -> Path:
    """The file to convert: ``source`` itself, or the weight file extracted from a release archive."""
    member = member_path(spec)
    if member is None or source == member or not zipfile.is_zipfile(source):
        return source
    if not member.exists():
        _extract_member(spec, source, member)
    return member


def _extract_member(spec: ModelSpec, archive_path: Path, target: Path) -> Path:
    member_name = Path(_require_source(spec).archive_member or "").name
    with zipfile.ZipFile(archive_path) as archive:
        names = [m for m in archive.namelist() if Path(m).name == member_name]
        if not names:
            raise WeightsError(f"{archive_path.name} does not contain {member_name} (model {spec.name!r})")
        with archive.open(names[0]) as member_stream:
            return copy_file(member_stream, target)


def _record_path(spec: ModelSpec) -> Path:
    return onnx_path(spec).with_name(f"{spec.name}.onnx.json")


def _cached_record(spec: ModelSpec, verify: bool = False) -> dict | None:
    """The conversion record when the cached ONNX is complete and matches the spec and converter.

    The size check catches a truncated copy at every use for the price of a stat; ``verify`` also
    compares the sha256 (what ``weights fetch`` does).
    """
    path, record_path = onnx_path(spec), _record_path(spec)
    try:
        record = json.loads(record_path.read_text())
        size = path.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("converter") != CONVERTER_VERSION:
        return None
    if record.get("spec") != json.loads(spec.to_json()) or record.get("onnx_size") != size:
        return None
    if verify and record.get("onnx_sha256") != sha256_of(path):
        return None
    return record


@contextmanager
def _lock(name: str) -> Iterator[None]:
    """An exclusive lock per model, so that concurrent processes convert a model only once."""
    folder = paths.locks_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------- user actions


def fetch(name: str, *, mirrors: list[Path] | None = None, progress: bool = True) -> tuple[Path, str]:
    """Get, verify and convert a model; returns (ONNX path, what happened).

    What happened is ``"ready"`` (the cached file matches its record, sha256 included), ``"converted"``
    (first time), ``"updated"`` (converted by an older version or from another registry row) or
    ``"repaired"`` (the cached file was damaged).
    """
    spec = get_model(name)
    if _cached_record(spec, verify=True) is not None:
        return onnx_path(spec), "ready"
    before = "repaired" if onnx_path(spec).exists() else "converted"
    if before == "repaired" and _is_stale(spec):
        before = "updated"
    path = ensure_onnx(spec, mirrors=mirrors, allow_download=True, progress=progress, verify=True)
    return path, before


def _is_stale(spec: ModelSpec) -> bool:
    """Whether the conversion record is intact but names another converter version or spec."""
    try:
        record = json.loads(_record_path(spec).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    return record.get("converter") != CONVERTER_VERSION or record.get("spec") != json.loads(spec.to_json())


def not_converted_error(spec: ModelSpec) -> WeightsError:
    """The error for a model that is not (or not completely) in the cache, with the remedy."""
    return WeightsError(
        f"model {spec.name!r} is not converted yet (it will be {onnx_path(spec)}); "
        f"run: deeplab weights fetch {spec.name}"
    )


def repair_hint(path: Path) -> str:
    """The remedy to append to a load error when ``path`` is a cached model's ONNX file, else ``""``."""
    if path.parent.resolve() != paths.models_dir().resolve() or path.suffix != ".onnx":
        return ""
    return f"; run: deeplab weights fetch {path.stem} to check and convert it again"


@dataclasses.dataclass(frozen=True)
class ImportRequest:
    """Options for importing a file whose checksum no registry row knows."""

    arch: str | None = None
    name: str | None = None
    classes_file: Path | None = None
    source_format: str | None = None


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """What importing one file gave: the models made ready, or the error that stopped it."""

    path: Path
    specs: tuple[ModelSpec, ...] = ()
    error: DeeplabError | None = None


def import_files(
    files: Sequence[Path],
    request: ImportRequest | None = None,
    on_result: Callable[[ImportResult], None] | None = None,
) -> list[ImportResult]:
    """Import several files; one file's failure is recorded in its result and does not stop the rest.

    ``on_result`` sees each file's result as soon as it is known (the CLI prints it).
    """
    request = request or ImportRequest()
    if request.arch is not None:
        if len(files) != 1:
            raise UsageError("--arch and --name import one file at a time")
        _template_for(request.arch)  # an unknown architecture is a usage error before any work
    results = []
    for path in files:
        try:
            result = ImportResult(Path(path), tuple(import_file(path, request)))
        except DeeplabError as exc:
            result = ImportResult(Path(path), error=exc)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def import_file(path: Path, request: ImportRequest | None = None) -> list[ModelSpec]:
    """Identify a local weight file (or a release zip), convert it, and keep it in the cache.

    Identification, in order: the sha256 against the registry (TFLite files with metadata are also
    zip archives, so this comes first); the members of a release archive; the file name (also an
    archive's member name, for rows without a recorded checksum); else ``request``'s architecture. Nothing
    is copied into the cache unless its conversion succeeded. Returns the models made ready.
    """
    request = request or ImportRequest()
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give the files in it (e.g. {path / '*.tflite'})")
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        with _cache_writes():
            return _import(path, request)
    except DeeplabError as exc:
        if path.name in str(exc) or isinstance(exc, CacheWriteError):
            raise
        raise type(exc)(f"{path.name}: {exc}") from exc


def _import(path: Path, request: ImportRequest) -> list[ModelSpec]:
    digest = sha256_of(path)
    if request.arch is not None:
        return [_import_user(path, _user_spec(path, digest, request))]
    spec = find_by_sha256(digest)
    if spec is not None:
        return [_import_as(spec, path, digest)]
    if zipfile.is_zipfile(path):
        specs = _archive_specs(path)
        if specs:
            return _import_archive(path, specs)
    spec = _match_by_name(path.name)
    if spec is not None:
        return [_import_as(spec, path, digest)]
    raise WeightsError(
        f"{path.name} (sha256 {digest[:12]}...) matches no registry model; to import your own "
        "weights give --arch and --name (see: deeplab models for architectures)"
    )


def _import_as(spec: ModelSpec, path: Path, digest: str) -> ModelSpec:
    """Convert a registry model's file straight from where it lies, then keep a copy in the cache.

    A file already imported (same sha256, converted model intact) is not converted again, so that
    re-running ``deeplab weights import folder/*.tflite`` is quick.
    """
    source, member = _require_source(spec), member_path(spec)
    keep = paths.sources_dir() / source.file
    if member is not None and path.name == Path(source.archive_member or "").name:
        keep = member  # the bare weight file of a release archive
    with _lock(spec.name):
        record = _cached_record(spec)
        if record is not None and record.get("source_sha256") == digest and keep.is_file():
            return spec
        try:
            _convert(spec, path)
        except WeightsError as exc:
            raise WeightsError(f"{exc} (importing it as {spec.name})") from exc
        if keep.resolve() != path.resolve():
            copy_file(path, keep)
    return spec


def _import_user(path: Path, spec: ModelSpec) -> ModelSpec:
    """Convert the user's own file; its row is recorded (and the file kept) only once that succeeded."""
    with _lock(spec.name):
        _convert(spec, path)
        copy_file(path, paths.sources_dir() / _require_source(spec).file)
        write_json(user_record_path(spec.name), json.loads(spec.to_json()))
    return spec


def _archive_specs(path: Path) -> list[ModelSpec]:
    """Registry models whose weight file is a member of this archive."""
    with zipfile.ZipFile(path) as archive:
        members = {Path(m).name for m in archive.namelist() if not m.endswith("/")}
    return [
        spec
        for spec in registry_models()
        if spec.source and spec.source.archive_member and Path(spec.source.archive_member).name in members
    ]


def _import_archive(path: Path, specs: list[ModelSpec]) -> list[ModelSpec]:
    """Import every registry model whose weight file is in this release archive; keep only their members.

    Each member is extracted to a scratch folder inside the cache and moved into place once converted,
    so a failure leaves nothing behind.
    """
    imported, errors = [], []
    paths.sources_dir().mkdir(parents=True, exist_ok=True)
    for spec in specs:  # releases of different networks may use the same member name
        member = member_path(spec)
        assert member is not None  # _archive_specs keeps rows with an archive member only
        with tempfile.TemporaryDirectory(prefix=".import-", dir=paths.sources_dir()) as scratch:
            extracted = _extract_member(spec, path, Path(scratch) / member.name)
            try:
                with _lock(spec.name):
                    _convert(spec, extracted)
                    os.replace(extracted, member)
                imported.append(spec)
            except WeightsError as exc:
                errors.append(f"{spec.name}: {exc}")
    if not imported:
        raise WeightsError(f"archive {path.name} fits no registry model: {'; '.join(errors)}")
    for error in errors:
        _say(f"skipped {error}")
    return imported


def _match_by_name(file_name: str) -> ModelSpec | None:
    """A registry row without a recorded checksum whose released file (or archive member) has this name."""
    for spec in registry_models():
        if spec.source is None or spec.source.sha256:
            continue
        member = Path(spec.source.archive_member).name if spec.source.archive_member else None
        if file_name in (spec.source.file, member):
            return spec
    return None


def _user_spec(path: Path, digest: str, request: ImportRequest) -> ModelSpec:
    """A spec for the user's own file, based on the registry row of the same architecture."""
    if not request.name:
        raise UsageError("--name is required with --arch")
    if any(spec.name == request.name for spec in registry_models()):
        raise UsageError(f"{request.name!r} is a registry model name; choose another --name")
    template = _template_for(request.arch or "")
    suffix_format = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    source_format = request.source_format or suffix_format or _require_source(template).format
    file_name = f"{request.name}{path.suffix or '.bin'}"
    source = Source(format=source_format, file=file_name, sha256=digest, size=path.stat().st_size)
    class_names = _read_classes(request.classes_file) if request.classes_file else template.class_names
    return dataclasses.replace(
        template,
        name=request.name,
        source=source,
        class_names=tuple(class_names),
        user=True,
        default=False,
        description=f"user import of {path.name} as {template.arch}",
        reported={},
        measured={},
    )


def _template_for(arch: str) -> ModelSpec:
    """The registry row a user import copies: the model named ``arch``, else the first of that architecture.

    Naming a registry model pins the variant too (e.g. the depth multiplier of a MobileNet).
    """
    rows = registry_models()
    by_name = next((s for s in rows if s.name == arch), None)
    template = by_name or next((s for s in rows if s.arch == arch), None)
    if template is None and arch in TEMPLATE_FOR_ARCH:
        sibling = next(s for s in rows if s.name == TEMPLATE_FOR_ARCH[arch])
        template = dataclasses.replace(sibling, arch=arch, arch_options={})
    if template is None:
        known = sorted({s.arch for s in rows})
        raise UsageError(
            f"unknown architecture {arch!r}; known: {', '.join(known)} (or a registry model name)"
        )
    return template


def _read_classes(path: Path) -> list[str]:
    """Class names, one per line (``idx<TAB>name`` lines are accepted)."""
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise UsageError(f"cannot read classes file {path}: {exc.strerror}") from exc
    names = [line.split("\t", 1)[-1] for line in lines]
    if len(names) < 2:
        raise UsageError(f"classes file {path} lists {len(names)} class(es); at least 2 are needed")
    return names


def export_model(
    spec: ModelSpec | str, dest: Path, *, fp16: bool = False, progress: bool = True, overwrite: bool = False
) -> Path:
    """Write ``spec``'s ONNX model (dynamic batch, height and width) to ``dest``, optionally in float16.

    float32 is the cached model itself; float16 goes through the same conversion as the cache
    (:func:`deeplab_cli.export.convert_to_onnx`) from the released file. An existing ``dest`` is
    replaced only with ``overwrite`` (checked before any work).
    """
    if not isinstance(spec, ModelSpec):
        spec = get_model(spec)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / f"{spec.name}{'-fp16' if fp16 else ''}.onnx"
    if not dest.parent.is_dir():
        raise UsageError(f"output folder does not exist: {dest.parent}")
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest} exists; pass --force to replace it")
    if not fp16:
        return copy_file(ensure_onnx(spec, progress=progress), dest)
    from deeplab_cli.export import convert_to_onnx

    with _cache_writes():
        weight_file = _weight_file(spec, source_path(spec, progress=progress))
    _say(f"converting {spec.name} to float16 ONNX (about {_estimate_s(spec, weight_file)} s)...")
    started = time.perf_counter()
    path = convert_to_onnx(weight_file, spec, dest, fp16=True)
    _say(f"done in {time.perf_counter() - started:.1f} s")
    return path
