"""Command-line inputs to a sorted list of image files: files, folders, globs and lists on stdin.

- A folder is walked recursively; a file counts as an image when its extension is an image extension or
  its first bytes are an image signature (so a corrupt ``.jpg`` is reported, not silently skipped).
  Hidden files and folders are skipped. Only regular files are opened: a FIFO, socket or device is
  skipped with a notice (opening a FIFO would hang the run).
- Symlinked subfolders are followed once; a link back to a folder already walked (``up -> ..``) is a
  loop and is skipped with a notice. Globs (``'data/**/*.png'``) use the same walker, so they never
  follow a loop either.
- Inside a folder tree marked as a deeplab output folder, our own outputs are skipped with a notice
  (:mod:`deeplab_cli.batch.marks`), so ``segment DIR -o DIR`` run twice does not segment its masks.
- ``-`` reads a list of paths from stdin: one per line (spaces kept; only the line break is removed),
  or NUL-separated with ``null=True`` (for ``find -print0``). Names are bytes, decoded as the OS does.
- The list is de-duplicated and sorted by absolute path; :func:`select_shard` keeps every n-th item.

Explicitly named files (arguments and stdin entries) are taken as given, own outputs included.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, TypeVar

from deeplab_cli import files
from deeplab_cli.batch import marks
from deeplab_cli.errors import UsageError

T = TypeVar("T")
# on_skip(path, reason): something found while expanding was left out, and why (one line each)
SkipCallback = Callable[[str, str], None]

SKIP_LOOP = "symlink loop (folder already walked)"
SKIP_OWN = "output of an earlier deeplab run"
SKIP_SPECIAL = "not a regular file"
SKIP_BROKEN = "broken symlink"
SKIP_OUTPUT_FOLDER = "the output folder of this run"


@dataclass(frozen=True)
class InputItem:
    """One input: its path as given (or found), the folder its output path is relative to, or an error."""

    path: str
    anchor: str
    error: str | None = None

    @property
    def abspath(self) -> str:
        return os.path.abspath(self.path)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None passes through."""
    if text is None:
        return None
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise UsageError(f"invalid --shard {text!r}: expected i/n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"invalid --shard {text!r}: need n >= 1 and 0 <= i < n")
    return index, count


def select_shard(items: list[T], shard: tuple[int, int] | None) -> list[T]:
    """The inputs of shard ``(i, n)``: positions ``i, i + n, i + 2n, ...`` of the sorted list."""
    if shard is None:
        return items
    index, count = shard
    return items[index::count]


def read_list(stream: IO[bytes] | IO[str], null: bool = False) -> list[str]:
    """Paths from a list on ``stream``: one per line, or NUL-separated; empty entries ignored."""
    source = getattr(stream, "buffer", stream)
    data = source.read()
    raw = data if isinstance(data, bytes) else os.fsencode(data)
    if null:
        entries = raw.split(b"\0")
    else:
        entries = [line[:-1] if line.endswith(b"\r") else line for line in raw.split(b"\n")]
    return [os.fsdecode(entry) for entry in entries if entry]


def expand_inputs(
    args: Iterable[str],
    stdin: IO[bytes] | IO[str] | None = None,
    exclude: Iterable[str | os.PathLike[str]] = (),
    null: bool = False,
    on_skip: SkipCallback | None = None,
) -> list[InputItem]:
    """Expand command-line inputs into a de-duplicated list sorted by path (see the module docstring).

    Inputs that do not exist become items with an ``error`` (reported per input, the run goes on).
    ``exclude``: folders not to walk into (the output folder, when it lies inside an input folder).
    ``on_skip(path, reason)`` hears about everything a walk or glob left out.
    """
    walker = _Walker({os.path.abspath(os.fspath(p)) for p in exclude}, on_skip or (lambda path, why: None))
    items: list[InputItem] = []
    stdin_used = False
    for arg in args:
        if arg == "-":
            if not stdin_used:
                stdin_used = True
                listed = read_list(stdin if stdin is not None else sys.stdin, null=null)
                items.extend(item for entry in listed if entry != "-" for item in walker.expand(entry))
            continue
        items.extend(walker.expand(arg))
    unique: dict[str, InputItem] = {}
    for item in items:
        unique.setdefault(item.abspath, item)
    return sorted(unique.values(), key=lambda item: item.abspath)


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


class _Walker:
    """Folder walks and glob matches that never loop and report what they leave out."""

    def __init__(self, exclude: set[str], on_skip: SkipCallback) -> None:
        self.exclude = exclude
        self.on_skip = on_skip

    def expand(self, arg: str) -> list[InputItem]:
        if os.path.isdir(arg):
            return [InputItem(path, anchor=arg) for path in self.walk(arg)]
        if os.path.lexists(arg):
            return [InputItem(arg, anchor=os.path.dirname(arg) or ".", error=_file_problem(arg))]
        if _is_glob(arg):
            found = self.glob(arg)
            if found:
                return found
            return [InputItem(arg, anchor=".", error=f"{arg}: no files match this pattern")]
        return [InputItem(arg, anchor=os.path.dirname(arg) or ".", error=f"{arg}: no such file")]

    # -- folder walks ------------------------------------------------------------------------------------

    def walk(self, top: str, max_depth: int | None = None) -> Iterator[str]:
        """Image files under ``top``, sorted, each folder (by device and inode) entered once."""
        for path, is_dir in self._entries(top, max_depth):
            if not is_dir:
                yield path

    def _entries(self, top: str, max_depth: int | None) -> Iterator[tuple[str, bool]]:
        """(path, is_folder) for every usable entry under ``top``, depth first, sorted by name."""
        visited: set[tuple[int, int]] = set()
        marked_top = _inside_marked_tree(top)
        stack: list[tuple[str, int, bool]] = [(top, 0, marked_top)]
        while stack:
            folder, depth, marked = stack.pop()
            try:
                info = os.stat(folder)
                names = sorted(os.listdir(folder))
            except OSError as exc:
                self.on_skip(folder, f"cannot list folder: {exc.strerror or exc}")
                continue
            if (info.st_dev, info.st_ino) in visited:
                self.on_skip(folder, SKIP_LOOP)
                continue
            visited.add((info.st_dev, info.st_ino))
            marked = marked or marks.MARKER in names
            subfolders = []
            for name in names:
                if name.startswith("."):
                    continue
                path = os.path.join(folder, name)
                kind = self._classify(path, marked)
                if kind == "folder":
                    if os.path.abspath(path) in self.exclude:
                        self.on_skip(path, SKIP_OUTPUT_FOLDER)
                        continue
                    if _identity(path) in visited:  # e.g. ``up -> ..``: an ancestor, walked already
                        self.on_skip(path, SKIP_LOOP)
                        continue
                    yield path, True
                    if max_depth is None or depth + 1 < max_depth:
                        subfolders.append(path)
                elif kind == "image":
                    yield path, False
            stack.extend((path, depth + 1, marked) for path in reversed(subfolders))

    def _classify(self, path: str, marked: bool) -> str | None:
        """ "folder", "image" or None (not an image, or skipped with a notice)."""
        try:
            info = os.stat(path)
        except OSError:
            self.on_skip(path, SKIP_BROKEN if os.path.islink(path) else "cannot stat")
            return None
        if stat.S_ISDIR(info.st_mode):
            return "folder"
        if not stat.S_ISREG(info.st_mode):
            self.on_skip(path, f"{SKIP_SPECIAL} ({_kind_name(info.st_mode)})")
            return None
        if not (files.has_image_extension(path) or files.is_image_file(path)):
            return None
        if marked and marks.is_own_output(path):
            self.on_skip(path, SKIP_OWN)
            return None
        return "image"

    # -- globs -------------------------------------------------------------------------------------------

    def glob(self, pattern: str) -> list[InputItem]:
        """Files matching ``pattern`` (``**`` = any folders, hidden names never matched by a wildcard);
        matched folders are walked."""
        base, rest = _split_glob(pattern)
        regex = _glob_regex(rest)
        depth = None if "**" in rest else rest.count("/") + 1
        found: list[InputItem] = []
        walked: list[str] = []
        root = base or "."
        if not os.path.isdir(root):
            return []
        for path, is_dir in self._entries(root, depth):
            relative = os.path.relpath(path, root)
            if not regex.fullmatch(relative):
                continue
            if is_dir:
                walked.append(path)
            else:
                found.append(InputItem(path, anchor=os.path.dirname(path) or "."))
        for folder in walked:
            found.extend(InputItem(path, anchor=folder) for path in self.walk(folder))
        return found


def _split_glob(pattern: str) -> tuple[str, str]:
    """(the folder before the first wildcard component, the rest of the pattern)."""
    parts = pattern.split("/")
    for index, part in enumerate(parts):
        if _is_glob(part):
            base = "/".join(parts[:index]) or ("/" if pattern.startswith("/") else "")
            return base, "/".join(parts[index:])
    return pattern, ""


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex for a relative glob: ``*`` and ``?`` within a name, ``**`` across folders, ``[...]`` sets."""
    out = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**/", index):
            out.append("(?:[^/]*/)*")
            index += 3
            continue
        if pattern.startswith("**", index):
            out.append(".*")
            index += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", index + 2)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[index + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                index = end
        else:
            out.append(re.escape(char))
        index += 1
    return re.compile("".join(out))


def _identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _inside_marked_tree(folder: str) -> bool:
    """Whether ``folder`` or one of its parents is a deeplab output folder."""
    current = os.path.abspath(folder)
    while True:
        if marks.is_marked(current):
            return True
        parent = os.path.dirname(current)
        if parent == current:
            return False
        current = parent


def _file_problem(path: str) -> str | None:
    """Why a named input cannot be read as a file (None when it can)."""
    try:
        info = os.stat(path)
    except OSError:
        return f"{path}: {SKIP_BROKEN}"
    if stat.S_ISREG(info.st_mode):
        return None
    return f"{path}: {SKIP_SPECIAL} ({_kind_name(info.st_mode)})"


def _kind_name(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device")):
        if test(mode):
            return name
    return "block device" if stat.S_ISBLK(mode) else "special file"
