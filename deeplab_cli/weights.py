"""The weight cache: released files in, converted ONNX models out.

Layout under :func:`home` (``$DEEPLAB_HOME``, else the user cache dir, e.g. ``~/.cache/deeplab``)::

    sources/<released file>     the upstream file, checked against its sha256
    models/<name>.onnx          the converted model (spec embedded as ONNX metadata)
    models/<name>.onnx.json     what it was converted from (source sha256, converter version)
    models/<name>.json          the spec of a model the user imported with an explicit architecture

A released file is looked for in the cache, then in the mirror folders (``--mirror`` or
``$DEEPLAB_MIRROR``, searched recursively by file name), then downloaded from its upstream URL unless
``$DEEPLAB_OFFLINE`` is set. Conversion happens once, under a file lock, and is written atomically.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deeplab_cli import paths
from deeplab_cli.download import DownloadError, download, sha256_of
from deeplab_cli.errors import UsageError, WeightsError
from deeplab_cli.files import copy_file, write_json
from deeplab_cli.zoo import ModelSpec, Source, find_by_sha256, get_model, registry_models

# Bump when conversion changes in a way that makes cached ONNX files stale.
CONVERTER_VERSION = 3
FORMAT_BY_SUFFIX = {".tflite": "tflite", ".caffemodel": "caffe"}
# Architectures without a registry row of their own borrow the input convention of a sibling's row.
TEMPLATE_FOR_ARCH = {"deeplab-v2-vgg16": "deeplab-v1-largefov"}


def onnx_path(spec: ModelSpec) -> Path:
    return paths.models_dir() / f"{spec.name}.onnx"


def is_ready(spec: ModelSpec) -> bool:
    """Whether the converted model is in the cache and up to date."""
    return _cached_record(spec) is not None


def user_models() -> list[ModelSpec]:
    """Specs of models the user imported with an explicit architecture (``models/<name>.json``)."""
    folder = paths.models_dir()
    if not folder.is_dir():
        return []
    specs = []
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(".onnx.json"):
            continue
        try:
            specs.append(ModelSpec.from_json(path.read_text()))
        except (ValueError, TypeError, KeyError) as exc:
            raise WeightsError(f"corrupt model record {path}: {exc}") from exc
    return specs


# ------------------------------------------------------------------------------------------- locating


def source_path(
    spec: ModelSpec, *, mirrors: list[Path] | None = None, allow_download: bool = True, progress: bool = True
) -> Path:
    """The released file of ``spec``: from the cache, a mirror, or (if allowed) its upstream URL."""
    source = _require_source(spec)
    cached = paths.sources_dir() / source.file
    if cached.exists() and _checksum_ok(cached, source):
        return cached
    found = _find_in_mirrors(source, paths.mirror_dirs(mirrors))
    if found is not None:
        return copy_file(found, cached)
    if not allow_download or paths.offline():
        raise WeightsError(
            f"{source.file} for model {spec.name!r} is not in the cache or a mirror and downloads are off; "
            f"get it from {source.url or 'its upstream release'} and run: deeplab weights import FILE"
        )
    return _download_source(spec, source, cached, progress)


def _require_source(spec: ModelSpec) -> Source:
    if spec.source is None:
        raise WeightsError(f"model {spec.name!r} has no source file recorded")
    return spec.source


def _checksum_ok(path: Path, source: Source) -> bool:
    return source.sha256 is None or sha256_of(path) == source.sha256


def _find_in_mirrors(source: Source, mirrors: list[Path]) -> Path | None:
    """The first file named ``source.file`` (or its archive) under a mirror whose checksum matches."""
    for mirror in mirrors:
        if not mirror.is_dir():
            continue
        for candidate in sorted(mirror.rglob(source.file)):
            if candidate.is_file() and _checksum_ok(candidate, source):
                return candidate
    return None


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
) -> Path:
    """The cached ONNX model for ``spec``, converting it on first use."""
    if not isinstance(spec, ModelSpec):
        spec = get_model(spec)
    if _cached_record(spec) is not None:
        return onnx_path(spec)
    with _lock(spec.name):
        if _cached_record(spec) is not None:  # converted by another process meanwhile
            return onnx_path(spec)
        source = source_path(spec, mirrors=mirrors, allow_download=allow_download, progress=progress)
        return _convert(spec, source)


def _convert(spec: ModelSpec, source: Path) -> Path:
    from deeplab_cli.export import convert_to_onnx

    target = onnx_path(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    convert_to_onnx(_weight_file(spec, source), spec, target)
    record = {
        "source_sha256": sha256_of(source),
        "converter": CONVERTER_VERSION,
        "spec": json.loads(spec.to_json()),
    }
    write_json(_record_path(spec), record)
    return target


def _weight_file(spec: ModelSpec, source: Path) -> Path:
    """The file to convert: ``source`` itself, or the weight file inside a release archive."""
    member = spec.source.archive_member if spec.source else None
    if not (member and zipfile.is_zipfile(source)):
        return source
    target = paths.sources_dir() / f"{spec.name}--{Path(member).name}"  # members of releases may share names
    if not target.exists():
        with zipfile.ZipFile(source) as archive:
            names = [m for m in archive.namelist() if Path(m).name == Path(member).name]
            if not names:
                raise WeightsError(f"{source.name} does not contain {member} (model {spec.name!r})")
            with archive.open(names[0]) as member_stream:
                copy_file(member_stream, target)
    return target


def _record_path(spec: ModelSpec) -> Path:
    return onnx_path(spec).with_name(f"{spec.name}.onnx.json")


def _cached_record(spec: ModelSpec) -> dict | None:
    """The conversion record when the cached ONNX is present and matches the spec and converter."""
    path, record_path = onnx_path(spec), _record_path(spec)
    if not (path.exists() and record_path.exists()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        return None
    if record.get("converter") != CONVERTER_VERSION or record.get("spec") != json.loads(spec.to_json()):
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


def fetch(name: str, *, mirrors: list[Path] | None = None, progress: bool = True) -> Path:
    """Download (or take from a mirror), verify and convert a registry model; returns the ONNX path."""
    return ensure_onnx(get_model(name), mirrors=mirrors, allow_download=True, progress=progress)


@dataclasses.dataclass(frozen=True)
class ImportRequest:
    """Options for importing a file whose checksum no registry row knows."""

    arch: str | None = None
    name: str | None = None
    classes_file: Path | None = None
    source_format: str | None = None


def import_file(path: Path, request: ImportRequest | None = None) -> list[ModelSpec]:
    """Identify a local weight file (or a release zip), copy it into the cache and convert it.

    A file is identified by its sha256 against the registry; a registry row without a recorded checksum
    matches by file name (also the name of its member inside a release archive). Any other file needs
    an explicit architecture and a name (``request``). Returns the models made ready.
    """
    request = request or ImportRequest()
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    if zipfile.is_zipfile(path) and request.arch is None:
        return _import_archive(path)
    spec = _identify(path, request)
    cached = copy_file(path, paths.sources_dir() / _cached_name(spec, path))
    with _lock(spec.name):
        _convert(spec, cached)
    if spec.user:  # recorded only once its conversion succeeded
        write_json(paths.models_dir() / f"{spec.name}.json", json.loads(spec.to_json()))
    return [spec]


def _cached_name(spec: ModelSpec, path: Path) -> str:
    """Where an imported file is kept: the released name, or the archive member's name if it is that."""
    member = spec.source.archive_member
    if member and path.name == Path(member).name:
        return path.name
    return spec.source.file


def _identify(path: Path, request: ImportRequest) -> ModelSpec:
    digest = sha256_of(path)
    if request.arch is None:
        spec = find_by_sha256(digest) or _match_by_name(path.name)
        if spec is None:
            raise WeightsError(
                f"{path.name} (sha256 {digest[:12]}...) matches no registry model; to import your own "
                "weights give --arch and --name (see: deeplab models for architectures)"
            )
        return spec
    return _user_spec(path, digest, request)


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
    template = _template_for(request.arch)
    suffix_format = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    source_format = request.source_format or suffix_format or template.source.format
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


def _import_archive(path: Path) -> list[ModelSpec]:
    """Import every registry model whose weight file is a member of this release archive."""
    with zipfile.ZipFile(path) as archive:
        members = {Path(m).name for m in archive.namelist() if not m.endswith("/")}
    specs = [
        spec
        for spec in registry_models()
        if spec.source and spec.source.archive_member and Path(spec.source.archive_member).name in members
    ]
    if not specs:
        raise WeightsError(f"archive {path.name} holds no weight file that a registry model expects")
    imported, errors = [], []
    for spec in specs:  # releases of different networks may use the same member name
        cached = copy_file(path, paths.sources_dir() / spec.source.file)
        try:
            with _lock(spec.name):
                _convert(spec, cached)
            imported.append(spec)
        except WeightsError as exc:
            errors.append(str(exc))
    if not imported:
        raise WeightsError(f"archive {path.name} fits no registry model: {'; '.join(errors)}")
    return imported


def export_model(spec: ModelSpec | str, dest: Path, *, fp16: bool = False, progress: bool = True) -> Path:
    """Write ``spec``'s ONNX model (dynamic batch, height and width) to ``dest``, optionally in float16."""
    if not isinstance(spec, ModelSpec):
        spec = get_model(spec)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / f"{spec.name}{'-fp16' if fp16 else ''}.onnx"
    if not dest.parent.is_dir():
        raise UsageError(f"output folder does not exist: {dest.parent}")
    if not fp16:
        return copy_file(ensure_onnx(spec, progress=progress), dest)
    from deeplab_cli.export import export_onnx
    from deeplab_cli.importers import load_weights

    source = source_path(spec, progress=progress)
    return export_onnx(load_weights(_weight_file(spec, source), spec), spec, dest, fp16=True)
