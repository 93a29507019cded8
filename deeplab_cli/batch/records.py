"""What a run reports: one :class:`Record` per input (the ``--json`` line) and the run's :class:`Summary`.

File names are bytes on POSIX; a name that is not valid UTF-8 reaches Python with lone surrogates
(``os.fsdecode``), which no JSON reader accepts. Records therefore carry such names with U+FFFD in
place of the undecodable bytes, plus the exact name in an extra ``*_bytes`` field (the bytes,
backslash-escaped as in ``bytes.decode(errors="backslashreplace")``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("ok", "skipped", "failed")


def printable(name: str) -> str:
    """``name`` with undecodable bytes (lone surrogates from ``os.fsdecode``) replaced by U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def escaped_bytes(name: str) -> str | None:
    """The raw bytes of a name that is not valid UTF-8, backslash-escaped; None for a valid name."""
    raw = os.fsencode(name)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace")
    return None


@dataclass
class Record:
    """The outcome for one input (one JSON line with ``--json``).

    ``status``: ``ok`` (outputs written now), ``skipped`` (outputs existed; with what the earlier run
    recorded, when it recorded it) or ``failed`` (``error`` says why, one line).
    """

    input: str
    status: str = "ok"
    outputs: dict[str, str] = field(default_factory=dict)
    size: dict[str, int] | None = None
    classes: list[dict[str, Any]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    scores: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: every string valid UTF-8 (see the module docstring)."""
        data: dict[str, Any] = {"input": printable(self.input), "status": self.status}
        raw = escaped_bytes(self.input)
        if raw is not None:
            data["input_bytes"] = raw
        if self.outputs:
            data["outputs"] = {kind: printable(path) for kind, path in self.outputs.items()}
        for key in ("size", "classes", "scores"):
            value = getattr(self, key)
            if value:
                data[key] = value
        if self.error:
            data["error"] = printable(self.error)
        if self.timings:
            data["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """The inverse of :meth:`to_dict` for the fields a resumed run reuses (unknown keys ignored)."""
        return cls(
            input=str(data.get("input", "")),
            status=str(data.get("status", "ok")),
            outputs=dict(data.get("outputs") or {}),
            size=data.get("size"),
            classes=data.get("classes"),
            timings=dict(data.get("timings") or {}),
            scores=data.get("scores"),
            error=data.get("error"),
        )


@dataclass
class Summary:
    """Counts of a run (the records themselves go to ``on_record`` and are not kept)."""

    ok: int = 0
    skipped: int = 0
    failed: int = 0
    elapsed: float = 0.0
    interrupted: bool = False

    def add(self, record: Record) -> None:
        setattr(self, record.status, getattr(self, record.status) + 1)

    @property
    def total(self) -> int:
        return self.ok + self.skipped + self.failed

    @property
    def exit_code(self) -> int:
        """The CLI's convention: 130 interrupted, 1 when an input failed, else 0."""
        if self.interrupted:
            return 130
        return 1 if self.failed else 0

    def line(self) -> str:
        rate = self.ok / self.elapsed if self.elapsed > 0 else 0.0
        return (
            f"{self.total} inputs: {self.ok} done, {self.skipped} skipped, {self.failed} failed "
            f"in {self.elapsed:.1f} s ({rate:.2f} images/s)"
        )
