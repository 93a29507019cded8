"""Parameters of the fully connected CRF, with DeepLab's names and defaults (DeepLab-LargeFOV)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["CRFParams"]


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
            raise ValueError(f"CRF iterations must be an integer, got {it!r}")
        object.__setattr__(self, "iterations", int(it))
        if self.iterations < 0:
            raise ValueError(f"CRF iterations must be >= 0, got {self.iterations}")
        for name in ("pos_w", "pos_xy_std", "bi_w", "bi_xy_std", "bi_rgb_std", "unary_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"CRF {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("pos_xy_std", "bi_xy_std", "bi_rgb_std", "unary_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CRF {name} must be > 0, got {getattr(self, name)}")
        for name in ("pos_w", "bi_w"):
            if getattr(self, name) < 0:
                raise ValueError(f"CRF {name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CRFParams:
        """Build from a mapping (e.g. a registry row's ``crf`` table); unknown keys are an error."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown CRF parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with every field (JSON-serialisable)."""
        return asdict(self)

    def replace(self, **changes: Any) -> CRFParams:
        """A copy with some fields changed (validated again)."""
        return CRFParams.from_dict({**self.to_dict(), **changes})
