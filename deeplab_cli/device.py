"""Where work runs: one parser for ``--device`` and one meaning of ``auto``.

``auto`` means "the first GPU when the runtime in question can use one, else the CPU": ONNX Runtime
asks whether its CUDA provider is installed, PyTorch (the CRF's CUDA path) whether it sees a GPU.
``cuda`` is ``cuda:0``; ``cuda:N`` keeps its index for every stage (network and CRF alike). Asking for
CUDA and not getting it is a :class:`DeviceError` with an install hint, never a silent CPU run.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from deeplab_cli.errors import DeviceError, UsageError

if TYPE_CHECKING:
    import torch

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
# One ONNX Runtime execution-provider entry: a name, or (name, options).
Provider = str | tuple[str, dict[str, object]]


@dataclass(frozen=True)
class Device:
    """A parsed ``--device``: ``kind`` is ``auto``, ``cpu`` or ``cuda``; ``index`` the GPU's number."""

    kind: str = "auto"
    index: int = 0

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind

    @property
    def wants_cuda(self) -> bool:
        """True when the user asked for a GPU explicitly (so not getting one is an error)."""
        return self.kind == "cuda"

    def onnx_providers(self) -> list[Provider]:
        """ONNX Runtime providers for this device; explicit CUDA without the CUDA provider raises."""
        import onnxruntime as ort

        available = ort.get_available_providers()
        if self.kind == "cuda" and CUDA_PROVIDER not in available:
            raise DeviceError(f"--device {self}: ONNX Runtime has no CUDA provider; {cuda_install_hint()}")
        if self.kind == "cpu" or CUDA_PROVIDER not in available:
            return [CPU_PROVIDER]
        # HEURISTIC: cuDNN's exhaustive search costs hundreds of ms for every new input shape
        options: dict[str, object] = {"device_id": self.index, "cudnn_conv_algo_search": "HEURISTIC"}
        return [(CUDA_PROVIDER, options), CPU_PROVIDER]

    def check_granted(self, granted: list[str]) -> None:
        """Raise when CUDA was asked for but the session fell back to the CPU (ORT only logs that)."""
        if self.kind == "cuda" and CUDA_PROVIDER not in granted:
            raise DeviceError(
                f"--device {self}: the CUDA provider failed to load (running on CPU); {cuda_install_hint()}"
            )

    def torch_device_name(self) -> str:
        """``"cpu"`` or ``"cuda:N"``: where PyTorch would run, without importing torch where the answer is
        the CPU anyway (``cpu``, or ``auto`` on a Linux machine with no GPU device: torch's import alone
        costs about a second, a third of a one-image ``segment --crf``)."""
        if self.kind == "cpu" or (self.kind == "auto" and not gpu_device_present()):
            return "cpu"
        return str(self.torch_device())

    def torch_device(self) -> torch.device:
        """The PyTorch device for this choice (``auto``: the first GPU if PyTorch sees one)."""
        import torch

        if self.kind == "cpu" or (self.kind == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {self}: PyTorch sees no GPU (the CRF's CUDA path needs a CUDA build of torch)"
            )
        if self.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {self}: PyTorch sees {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", self.index)


def gpu_device_present() -> bool:
    """Whether this machine could have a GPU for PyTorch: on Linux, an NVIDIA (``/dev/nvidiaN``), AMD
    (``/dev/kfd``) or WSL (``/dev/dxg``) device node; elsewhere assumed, so torch is asked."""
    if not sys.platform.startswith("linux"):
        return True
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg")


def parse_device(text: str | Device | None) -> Device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (any case) -> :class:`Device`; else a usage error."""
    if isinstance(text, Device):
        return text
    value = (text or "auto").strip().lower()
    if value in ("auto", "cpu"):
        return Device(value)
    if value == "cuda":
        return Device("cuda", 0)
    if value.startswith("cuda:") and value[5:].isdigit():
        return Device("cuda", int(value[5:]))
    raise UsageError(f"invalid device {text!r}; use auto, cpu, cuda or cuda:N")


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cuda_install_hint() -> str:
    """What to do when ONNX Runtime cannot use the GPU: the README's install advice, word for word.

    ``onnxruntime`` (a core dependency) and ``onnxruntime-gpu`` install into the same folder and the one
    installed last wins, so the fix is always to remove both and install the GPU build alone.
    """
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
    gpu, cpu = _installed("onnxruntime-gpu"), _installed("onnxruntime")
    if gpu and cpu:
        return f"onnxruntime {cpu} shadows onnxruntime-gpu {gpu}: {fix}"
    if not gpu:
        return f"the GPU build of ONNX Runtime is not installed: {fix}"
    return "check that the CUDA 12/13 and cuDNN 9 libraries are on the library path and a GPU is visible"
