"""``--device``: one parser, one meaning of auto, the GPU index kept, a loud error when CUDA is missing."""

from __future__ import annotations

import pytest

from deeplab_cli import paths
from deeplab_cli.device import CPU_PROVIDER, Device, cuda_install_hint, parse_device
from deeplab_cli.errors import DeviceError, UsageError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("auto", Device("auto")),
        (None, Device("auto")),
        ("CPU", Device("cpu")),
        ("cuda", Device("cuda", 0)),
        (" cuda:3 ", Device("cuda", 3)),
    ],
)
def test_parse_device_keeps_the_index(text: str | None, expected: Device) -> None:
    assert parse_device(text) == expected
    assert parse_device(expected) is expected


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cuda:-1", "tpu:0"])
def test_parse_device_rejects_other_words(text: str) -> None:
    with pytest.raises(UsageError, match="use auto, cpu, cuda or cuda:N"):
        parse_device(text)


def test_str_round_trips() -> None:
    for text in ("auto", "cpu", "cuda:0", "cuda:2"):
        assert str(parse_device(text)) == text


def test_auto_and_cpu_run_on_the_cpu_without_a_gpu() -> None:
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" in ort.get_available_providers() or torch.cuda.is_available():
        pytest.skip("a GPU runtime is present")
    assert Device("auto").onnx_providers() == [CPU_PROVIDER]
    assert Device("cpu").onnx_providers() == [CPU_PROVIDER]
    assert Device("auto").torch_device().type == "cpu"


def test_explicit_cuda_without_a_gpu_is_a_loud_error() -> None:
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" in ort.get_available_providers() or torch.cuda.is_available():
        pytest.skip("a GPU runtime is present")
    with pytest.raises(DeviceError, match=r"--device cuda:1: ONNX Runtime has no CUDA provider"):
        Device("cuda", 1).onnx_providers()
    with pytest.raises(DeviceError, match=r"--device cuda:1: PyTorch sees no GPU"):
        Device("cuda", 1).torch_device()
    with pytest.raises(DeviceError, match="fell back|failed to load"):
        Device("cuda", 0).check_granted([CPU_PROVIDER])


def test_install_hint_matches_the_readme() -> None:
    from conftest import REPO

    hint = cuda_install_hint()
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in hint
    assert (
        "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
        in (REPO / "README.md").read_text()
    )


def test_paths_follow_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DEEPLAB_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("DEEPLAB_MIRROR", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    monkeypatch.delenv("DEEPLAB_DATA", raising=False)
    monkeypatch.setenv("DEEPLAB_OFFLINE", "no")
    assert paths.models_dir() == tmp_path / "h" / "models"
    assert paths.data_root() == tmp_path / "h" / "data"
    assert paths.mirror_dirs([tmp_path / "x"]) == [tmp_path / "x", tmp_path / "a", tmp_path / "b"]
    assert not paths.offline()
    monkeypatch.setenv("DEEPLAB_OFFLINE", "1")
    assert paths.offline()
    monkeypatch.setenv("DEEPLAB_MAX_PIXELS", "1000")
    assert paths.max_pixels() == 1000


def test_torch_device_name_agrees_with_torch() -> None:
    """The name is what ``torch_device`` says, whether or not it had to import torch to know."""
    for text in ("auto", "cpu"):
        device = parse_device(text)
        assert device.torch_device_name() == str(device.torch_device())


def test_one_image_crf_run_on_a_cpu_machine_does_not_import_torch(tmp_path) -> None:
    """``segment --crf`` with the default device and backend: numba on the CPU, and no second of
    ``import torch`` just to learn that there is no GPU."""
    import subprocess
    import sys

    from conftest import VOC2012, voc_sample_ids
    from segment_helpers import DM05

    from deeplab_cli.device import gpu_device_present

    if gpu_device_present():
        pytest.skip("a GPU device node exists: auto asks torch")
    image = VOC2012 / "JPEGImages" / f"{voc_sample_ids(1)[0]}.jpg"
    code = (
        "import sys\nfrom deeplab_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    args = ["segment", str(image), "-o", str(tmp_path / "out"), "--crf", "-m", DM05, "-q"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "no torch"
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_crf_refine_on_a_cpu_machine_does_not_import_torch() -> None:
    """The library's ``refine`` with the default backend and device asks the same question as the CLI."""
    import subprocess
    import sys

    from deeplab_cli.device import gpu_device_present

    if gpu_device_present():
        pytest.skip("a GPU device node exists: auto asks torch")
    code = (
        "import sys\nimport numpy as np\nfrom deeplab_cli.crf import refine\n"
        "image = np.zeros((20, 30, 3), np.uint8)\nprobs = np.full((3, 20, 30), 1 / 3, np.float32)\n"
        "for device in (None, 'auto', 'cpu'):\n"
        "    assert refine(image, probs, device=device).shape == probs.shape\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "no torch"
