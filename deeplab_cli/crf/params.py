"""Parameters of the fully connected CRF, with DeepLab's names and defaults (DeepLab-LargeFOV).

One constructor rule: :meth:`CRFParams.from_dict` rejects unknown keys, wherever the values come from (a
registry row, a parameter file, the command line). :func:`resolve` layers them: the model's defaults, then
a parameter file (e.g. written by ``deeplab crf tune``), then explicit overrides. This module is light on
purpose: plain ``deeplab segment --crf`` reads its parameters without importing the search module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from deeplab_cli.errors import UsageError

__all__ = [
    "CRFParams",
    "CRFParamsError",
    "LATTICE_POINT_BLOCK",
    "PARAM_NAMES",
    "PROB_FLOOR",
    "load_params",
    "resolve",
]

# Every backend clips probabilities here before the log: the unary is -unary_scale * log(max(p, 1e-8)),
# at most 18.4 * unary_scale.
PROB_FLOOR = 1e-8

# densecrf's lattice build on x86 (its SSE path, in pydensecrf and in DeepLab's Caffe alike) locates points
# four at a time and pads the last group with all-zero features, whose simplex corners it inserts too:
# when N is not a multiple of 4 the lattice has the origin's vertices (if no point has them already),
# which take part in the blur. Every backend's lattice adds that point after the real ones, as it does.
LATTICE_POINT_BLOCK = 4


class CRFParamsError(UsageError, ValueError):
    """A CRF parameter is unknown, not a number or out of range (a usage error: exit 2).

    Also a ``ValueError`` so that library callers that validate values themselves can catch it as one.
    """


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF settings.

    ``bi_*``: the appearance (bilateral) kernel ``bi_w * exp(-|p_i-p_j|²/2 bi_xy_std² - |I_i-I_j|²/2
    bi_rgb_std²)``; ``pos_*``: the smoothness kernel ``pos_w * exp(-|p_i-p_j|²/2 pos_xy_std²)``;
    ``iterations``: mean-field steps; ``unary_scale``: the unary is ``-unary_scale * log(p)`` (a softmax
    temperature multiplier, 1 = the network's probabilities as they are).
    """

    iterations: int = 10
    pos_w: float = 3.0
    pos_xy_std: float = 3.0
    bi_w: float = 4.0
    bi_xy_std: float = 121.0
    bi_rgb_std: float = 5.0
    unary_scale: float = 1.0

    def __post_init__(self) -> None:
        it = self.iterations
        if (
            isinstance(it, bool)
            or not isinstance(it, int)
            and not (isinstance(it, float) and it.is_integer())
        ):
            raise CRFParamsError(f"CRF iterations must be an integer, got {it!r}")
        object.__setattr__(self, "iterations", int(it))
        if self.iterations < 0:
            raise CRFParamsError(f"CRF iterations must be >= 0, got {self.iterations}")
        for name in ("pos_w", "pos_xy_std", "bi_w", "bi_xy_std", "bi_rgb_std", "unary_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CRFParamsError(f"CRF {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("pos_xy_std", "bi_xy_std", "bi_rgb_std", "unary_scale"):
            if getattr(self, name) <= 0:
                raise CRFParamsError(f"CRF {name} must be > 0, got {getattr(self, name)}")
        for name in ("pos_w", "bi_w"):
            if getattr(self, name) < 0:
                raise CRFParamsError(f"CRF {name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CRFParams:
        """Build from a mapping (a registry row, a file, options); unknown keys are an error."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(PARAM_NAMES))
        if unknown:
            raise CRFParamsError(
                f"unknown CRF parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(PARAM_NAMES))})"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with every field (JSON-serialisable)."""
        return asdict(self)

    def replace(self, **changes: Any) -> CRFParams:
        """A copy with some fields changed (validated again)."""
        return CRFParams.from_dict({**self.to_dict(), **changes})


PARAM_NAMES: tuple[str, ...] = tuple(f.name for f in fields(CRFParams))


def load_params(path: Path | str) -> dict[str, Any]:
    """The CRF parameters in a JSON file, as a mapping (validated by :func:`resolve`).

    Accepts a ``deeplab crf tune`` result (its ``crf`` object) or a flat object with the parameter names.
    Unreadable files, invalid JSON and files without any parameter are one-line usage errors.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CRFParamsError(f"cannot read CRF parameters {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CRFParamsError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("crf"), dict):
        data = data["crf"]
    if not isinstance(data, dict) or not any(name in data for name in PARAM_NAMES):
        raise CRFParamsError(
            f"{path}: no CRF parameters found (expected keys such as bi_w, bi_xy_std, bi_rgb_std)"
        )
    return dict(data)


def resolve(
    defaults: CRFParams | None, file: Path | str | None = None, overrides: Mapping[str, Any] | None = None
) -> CRFParams:
    """``defaults`` (e.g. the model's), then the parameters in ``file``, then ``overrides`` (None = unset)."""
    values = (defaults or CRFParams()).to_dict()
    if file is not None:
        values.update(load_params(file))
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return CRFParams.from_dict(values)
