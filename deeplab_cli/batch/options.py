"""What ``deeplab segment`` produces and how: :class:`SegmentOptions` (one object, the command's flags)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO

from deeplab_cli.batch.marks import OUTPUT_SUFFIXES
from deeplab_cli.errors import UsageError

SCORE_KINDS = ("logits", "probs")


def output_kinds(mask: bool, overlay: bool, scores: str | None) -> list[str]:
    """The output kinds asked for, in the order they are written (keys of ``OUTPUT_SUFFIXES``)."""
    kinds = ["mask"] if mask else []
    if overlay:
        kinds.append("overlay")
    if scores:
        if scores not in SCORE_KINDS:
            raise UsageError(f"invalid --scores {scores!r}: use logits or probs")
        kinds.append(scores)
    assert set(kinds) <= set(OUTPUT_SUFFIXES)
    return kinds


@dataclass
class SegmentOptions:
    """The ``deeplab segment`` flags that shape a run (the model, device and CRF come separately)."""

    mask: bool = True
    overlay: bool = False
    overlay_alpha: float = 0.5
    scores: str | None = None  # "logits" | "probs"
    skip_existing: bool = False
    shard: tuple[int, int] | None = None
    batch_size: int = 1
    workers: int = 0  # reader/writer threads each; 0 = min(4, cores)
    fsync: bool = False
    null: bool = False  # a list on stdin is NUL-separated (``find -print0``)
    stdin: IO[bytes] | IO[str] | None = None  # where ``-`` reads its list (default: sys.stdin)
    stdout_stream: IO[bytes] | None = None  # with no output folder: where the one mask PNG goes

    @property
    def threads(self) -> int:
        return self.workers or min(4, os.cpu_count() or 1)

    @property
    def kinds(self) -> list[str]:
        return output_kinds(self.mask, self.overlay, self.scores)
