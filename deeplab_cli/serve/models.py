"""The models a server holds: loaded once, in the background, and what ``/readyz`` reports of them."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deeplab_cli.device import CUDA_PROVIDER, parse_device
from deeplab_cli.errors import DeeplabError, UsageError
from deeplab_cli.zoo import get_model

if TYPE_CHECKING:
    from deeplab_cli.runtime import Segmenter
    from deeplab_cli.serve.config import ServeConfig


def check_model_names(names: tuple[str, ...]) -> None:
    """Fail at start-up, before binding, on an unknown registry name or a missing .onnx file."""
    for name in names:
        if name.lower().endswith(".onnx"):
            if not Path(name).is_file():
                raise UsageError(f"model file not found: {name}")
        else:
            get_model(name)


def granted_ok(device: str, providers: list[str]) -> bool:
    """Whether a session on ``providers`` is what ``--device`` asked for: a GPU asked for must be granted."""
    return not parse_device(device).wants_cuda or CUDA_PROVIDER in providers


@dataclass
class ServedModel:
    """One model of the server: ``loading`` until its sessions exist, then ``ready`` or ``failed``."""

    name: str
    segmenter: Segmenter | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "ready" if self.segmenter is not None else "loading"


class ModelSet:
    """The served models by name; the first is the default."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.models = {name: ServedModel(name) for name in config.models}
        self.default = config.models[0]
        self.crf_status = "pending"  # then "ready", or the warm-up's error

    def start_loading(self) -> None:
        """Load every model in a background thread (conversion on first use can take a minute)."""
        threading.Thread(target=self.load_all, name="deeplab-serve-load", daemon=True).start()

    def load_all(self) -> None:
        for served in self.models.values():
            self._load(served)
        self.crf_status = warm_up_crf(self.config)

    def _load(self, served: ServedModel) -> None:
        from deeplab_cli.runtime import Segmenter

        config = self.config
        try:
            segmenter = Segmenter(
                served.name,
                device=config.device,
                max_size=config.max_size or None,
                sessions=config.workers,
            )
        except DeeplabError as exc:
            served.error = str(exc)
        except Exception as exc:  # a model that cannot load makes the server not ready, it does not crash it
            served.error = f"{type(exc).__name__}: {exc}"
        else:
            if granted_ok(config.device, segmenter.providers):
                served.segmenter = segmenter
            else:
                served.error = (
                    f"--device {config.device} asked for but granted {', '.join(segmenter.providers)}"
                )
        if served.error is not None:
            print(f"deeplab: error: model {served.name}: {served.error}", file=sys.stderr, flush=True)

    def get(self, name: str | None) -> ServedModel:
        """The model for a request (None: the default); unknown names are a :class:`UsageError`."""
        served = self.models.get(name or self.default)
        if served is None:
            served = next(
                (m for m in self.models.values() if m.segmenter and m.segmenter.spec.name == name), None
            )
        if served is None:
            raise UsageError(f"model {name!r} is not served here; served: {', '.join(self.models)}")
        return served

    @property
    def ready(self) -> bool:
        """Every model loaded on the device asked for, and the CRF warmed up (so no request waits for a
        compilation that could outlast its timeout)."""
        return self.crf_status == "ready" and all(m.status == "ready" for m in self.models.values())

    def report(self) -> dict[str, dict[str, object]]:
        """Per model: status, the execution providers really granted, or the error."""
        report: dict[str, dict[str, object]] = {}
        for served in self.models.values():
            entry: dict[str, object] = {"status": served.status}
            if served.segmenter is not None:
                entry["providers"] = served.segmenter.providers
                entry["model"] = served.segmenter.spec.name
                entry["protocol"] = served.segmenter.describe_protocol()
            if served.error is not None:
                entry["error"] = served.error
            report[served.name] = entry
        return report


def warm_up_crf(config: ServeConfig) -> str:
    """Run the CRF backend once on a tiny image, so that the first ``crf=true`` request does not pay for
    its imports and compilation (numba compiles for tens of seconds when its disk cache is cold): "ready",
    or the error (reported by ``/readyz``; requests without the CRF are served meanwhile)."""
    import numpy as np

    from deeplab_cli.crf.params import CRFParams
    from deeplab_cli.crf.runner import CRFRunner

    image = np.zeros((8, 8, 3), dtype=np.uint8)
    probs = np.full((2, 8, 8), 0.5, dtype=np.float32)
    try:
        with CRFRunner(CRFParams(iterations=1), config.crf_backend, device=config.crf_device) as runner:
            runner.refine(image, probs)
    except Exception as exc:  # noqa: BLE001 - reported by /readyz and on stderr, the server goes on
        print(f"deeplab: error: CRF warm-up failed: {exc}", file=sys.stderr, flush=True)
        return f"failed: {exc}"
    return "ready"
