"""``deeplab segment --engine ray`` and ``segment_dataset`` on real Ray clusters started here.

One single-node Ray (2 CPUs) serves the tests of :class:`TestSingleNode`, a two-node cluster
(``ray.cluster_utils.Cluster``, two raylets on this machine) those of :class:`TestTwoNodes`; every run
is compared with the local engine's output on the same shared VOC images. Skipped only without Ray.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import VOC2012, voc_sample_ids
from segment_helpers import DM05, command, invoke

from deeplab_cli.files import TMP_SUFFIX

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
pytest.importorskip("ray.data", reason="the [ray] extra is not installed")

IMAGE_COUNT = 5
RAY_QUIET = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
OBJECT_STORE = 300 * 2**20


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five VOC photos in nested folders, plus a truncated JPEG among them."""
    root = tmp_path_factory.mktemp("photos")
    for number, image_id in enumerate(voc_sample_ids(IMAGE_COUNT)):
        folder = root / ("a" if number % 2 else "b")
        folder.mkdir(exist_ok=True)
        shutil.copy(VOC2012 / "JPEGImages" / f"{image_id}.jpg", folder / f"{image_id}.jpg")
    good = next(root.rglob("*.jpg")).read_bytes()
    (root / "b" / "broken.jpg").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def local_masks(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local engine's output for ``photos`` (the reference every Ray run must match byte for byte)."""
    out = tmp_path_factory.mktemp("local")
    outcome = invoke(["segment", photos, "-o", out, "-m", DM05, "-q"])
    assert outcome.code == 1, outcome.stderr  # the truncated file
    return out


def _masks(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def _records(stdout: str) -> list[dict]:
    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    for record in records:
        record.pop("timings", None)
    return records


def _ray_segment(args: list) -> tuple[int, str, str]:
    outcome = invoke(["segment", *args, "-m", DM05, "--engine", "ray"])
    return outcome.code, outcome.text, outcome.stderr


@pytest.fixture(scope="class")
def single_node() -> object:
    ray.init(address="local", num_cpus=2, object_store_memory=OBJECT_STORE, **RAY_QUIET)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="class")
def two_nodes() -> object:
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.xdist_group("ray-single-node")  # with --dist loadgroup: one cluster start for the class
@pytest.mark.usefixtures("single_node")
class TestSingleNode:
    def test_same_masks_and_records_as_local_with_one_bad_file(
        self, photos: Path, local_masks: Path, tmp_path: Path
    ) -> None:
        code, stdout, stderr = _ray_segment([photos, "-o", tmp_path / "out", "--json"])
        assert code == 1, stderr
        records = _records(stdout)
        failed = [r for r in records if r["status"] == "failed"]
        assert [Path(r["input"]).name for r in failed] == ["broken.jpg"]
        assert sum(r["status"] == "ok" for r in records) == IMAGE_COUNT
        assert "broken.jpg" in stderr and "Traceback" not in stderr
        assert _masks(tmp_path / "out") == _masks(local_masks)
        local = invoke(["segment", photos, "-o", tmp_path / "again", "-m", DM05, "--json"])
        expected = [
            {**r, "outputs": {k: v.replace("again", "out") for k, v in r.get("outputs", {}).items()}}
            for r in _records(local.text)
        ]
        assert [{k: v for k, v in r.items() if v} for r in expected] == records

    def test_separate_stages_write_the_local_masks(
        self, photos: Path, local_masks: Path, tmp_path: Path
    ) -> None:
        """The GPU plan (decode tasks -> inference actors -> finish actors), run with CPU inference."""
        from deeplab_cli.batch import SegmentOptions
        from deeplab_cli.ray import RayOptions, segment_files_ray
        from deeplab_cli.ray.engine import build_dataset
        from deeplab_cli.runtime import Segmenter

        records = []
        out = tmp_path / "out"
        staged = RayOptions(separate_stages=True)
        segmenter = Segmenter(DM05)
        segment_files_ray(
            [str(photos)], out, SegmentOptions(), segmenter, on_record=records.append, ray_options=staged
        )
        assert sorted(Path(r.input).name for r in records if r.status == "failed") == ["broken.jpg"]
        assert _masks(out) == _masks(local_masks)
        plan = repr(build_dataset(ray, ["job"], segmenter, SegmentOptions(), None, staged))
        assert all(stage in plan for stage in ("decode_row", "Infer", "Finish")), plan
        fused = repr(build_dataset(ray, ["job"], segmenter, SegmentOptions(), None, RayOptions()))
        assert "Segment" in fused and "Infer" not in fused, fused

    def test_resume_after_interrupt_rewrites_nothing(
        self, photos: Path, local_masks: Path, tmp_path: Path
    ) -> None:
        from deeplab_cli.batch import SegmentOptions
        from deeplab_cli.ray import segment_files_ray
        from deeplab_cli.runtime import Segmenter

        out = tmp_path / "out"
        seen: list[str] = []

        def stop_after_two(record: object) -> None:
            seen.append(record.input)
            if len(seen) == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            segment_files_ray([str(photos)], out, SegmentOptions(), Segmenter(DM05), on_record=stop_after_two)
        assert ray.is_initialized()  # a Ray this process joined is left running
        before = {name: (out / name).stat() for name in _masks(out)}
        assert 2 <= len(before) <= IMAGE_COUNT
        code, stdout, stderr = _ray_segment([photos, "-o", out, "--json", "--skip-existing"])
        assert code == 1, stderr
        statuses = {Path(r["input"]).name: r["status"] for r in _records(stdout)}
        assert sum(s == "skipped" for s in statuses.values()) == len(before)
        assert sum(s == "ok" for s in statuses.values()) == IMAGE_COUNT - len(before)
        for name, stat in before.items():
            now = (out / name).stat()
            assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
        assert _masks(out) == _masks(local_masks)

    def test_crf_matches_local_engine(self, photos: Path, tmp_path: Path) -> None:
        two = sorted((photos / "a").glob("*.jpg"))[:2]
        local = invoke(["segment", *two, "-o", tmp_path / "local", "-m", DM05, "--crf", "-q"])
        assert local.code == 0, local.stderr
        code, _, stderr = _ray_segment([*two, "-o", tmp_path / "ray", "--crf", "-q"])
        assert code == 0, stderr
        assert invoke(["segment", *two, "-o", tmp_path / "plain", "-m", DM05, "-q"]).code == 0
        assert _masks(tmp_path / "ray") == _masks(tmp_path / "local") != _masks(tmp_path / "plain")

    def test_segment_dataset_adds_labels(self, photos: Path) -> None:
        from deeplab_cli.files import read_image
        from deeplab_cli.ray import segment_dataset
        from deeplab_cli.runtime import Segmenter

        paths = sorted(str(p) for p in (photos / "a").glob("*.jpg"))
        images = [read_image(p) for p in paths]
        ds = ray.data.from_items(
            [{"image": image, "path": p} for image, p in zip(images, paths, strict=True)]
        )
        rows = segment_dataset(ds, model=DM05).take_all()
        segmenter = Segmenter(DM05)
        assert [row["path"] for row in rows] == paths
        for row, image in zip(rows, images, strict=True):
            assert row["label"].shape == image.shape[:2]
            np.testing.assert_array_equal(row["label"], segmenter.predict(image).labels)

    def test_segment_dataset_crf_and_scores(self, photos: Path) -> None:
        from deeplab_cli.crf import CRFParams
        from deeplab_cli.crf.runner import CRFRunner
        from deeplab_cli.files import read_image
        from deeplab_cli.ray import segment_dataset
        from deeplab_cli.runtime import Segmenter

        image = read_image(next((photos / "a").glob("*.jpg")))
        params = {"iterations": 3}
        (row,) = segment_dataset(
            ray.data.from_items([{"image": image}]), DM05, params, scores=True
        ).take_all()
        segmenter = Segmenter(DM05)
        runner = CRFRunner(CRFParams.from_dict({**segmenter.spec.crf, **params}), workers=0, threads=1)
        expected = segmenter.predict(image, return_probs=True, crf=runner)
        np.testing.assert_array_equal(row["label"], expected.labels)
        np.testing.assert_array_equal(row["score"], expected.probs)
        assert not np.array_equal(row["label"], segmenter.predict(image).labels)

    def test_stdout_output_is_refused(self, photos: Path) -> None:
        code, _, stderr = _ray_segment([next(photos.rglob("*.jpg")), "-o", "-"])
        assert code == 2 and "output folder" in stderr


@pytest.mark.xdist_group("ray-two-nodes")
@pytest.mark.usefixtures("two_nodes")
class TestTwoNodes:
    def test_two_nodes_write_the_local_masks(self, photos: Path, local_masks: Path, tmp_path: Path) -> None:
        assert sum(node["Alive"] for node in ray.nodes()) == 2
        code, stdout, stderr = _ray_segment([photos, "-o", tmp_path / "out", "--json", "--concurrency", "1"])
        assert code == 1, stderr
        assert [Path(r["input"]).name for r in _records(stdout) if r["status"] == "failed"] == ["broken.jpg"]
        assert _masks(tmp_path / "out") == _masks(local_masks)


def _ray_processes(driver: int) -> set[int]:
    """Pids of the Ray daemons (gcs_server, raylet) of the local Ray that process ``driver`` started.

    Ray names a session after the pid of the process that started it (``session_<time>_<pid>``), so
    clusters of other tests (other xdist workers) running meanwhile are not counted.
    """
    session = re.compile(rf"session_[0-9_-]+_{driver}\b".encode())
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                name = (entry / "comm").read_text().strip()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if name in ("gcs_server", "raylet") and session.search(cmdline):
                found.add(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_sigint_stops_and_leaves_no_ray_process(photos: Path, tmp_path: Path) -> None:
    """A local Ray started by the command is gone after Ctrl-C; the exit status is 130."""
    out = tmp_path / "out"
    args = ["segment", photos, "-o", out, "-m", DM05, "--engine", "ray", "-q"]
    process = subprocess.Popen(command(args), stderr=subprocess.PIPE, env=dict(os.environ))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and not list(out.rglob("*.png")):
        time.sleep(0.1)
    assert _ray_processes(process.pid), "the command's own Ray is running"
    process.send_signal(signal.SIGINT)  # midway: one mask written, the others not yet
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr.decode()
    assert "Traceback" not in stderr.decode()
    deadline = time.monotonic() + 30
    while _ray_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(process.pid)
    assert not [p for p in out.rglob("*") if p.name.endswith(TMP_SUFFIX)]  # nothing half-written


def _free_port() -> int:
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.xdist_group("ray-single-node")  # not beside a fixture that starts a Ray without an address
def test_runs_beside_a_ray_started_here(photos: Path, local_masks: Path, tmp_path: Path) -> None:
    """``ray start`` already runs a Ray on this machine: without --ray-address the command still starts
    (and stops) a Ray of its own (Ray would otherwise join that one and refuse our CPU count), and the
    user's Ray keeps running."""
    import socket

    port = _free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    start = [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=1"]
    start.append("--include-dashboard=false")
    head = subprocess.Popen(
        start,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        out = tmp_path / "out"
        code, _, stderr = _ray_segment([photos, "-o", out, "-q"])
        assert code == 1, stderr  # the truncated file, as locally
        assert _masks(out) == _masks(local_masks)
        assert head.poll() is None, "the user's Ray was stopped"
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        head.terminate()  # --block: the ray start process stops the Ray it started
        head.wait(timeout=60)
        _forget_cluster(port)


def _forget_cluster(port: int) -> None:
    """Remove Ray's note of the cluster on ``port`` (``ray stop`` would, but it stops every Ray here):
    left behind, a bare ``ray.init()`` elsewhere would try to join the stopped cluster."""
    from ray._private.utils import get_ray_address_file

    note = Path(get_ray_address_file(None))
    if note.is_file() and note.read_text().strip().endswith(f":{port}"):
        note.unlink()


def test_unreachable_address_one_line_and_exit_2(photos: Path, tmp_path: Path) -> None:
    """Nobody listens at the address: one line within seconds, not Ray's minutes of retries."""
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    args = ["segment", photos, "-o", tmp_path / "out", "--engine", "ray", "--ray-address", address]
    result = subprocess.run(command(args), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"deeplab: error: cannot reach the Ray cluster at {address}: Connection refused"
    ]
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out").exists()


def test_without_ray_one_line_and_exit_2(photos: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None; sys.argv = ['deeplab'] + sys.argv[1:]; "
        "from deeplab_cli.cli import main; main()"
    )
    args = ["segment", str(photos), "-o", str(tmp_path), "--engine", "ray"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'deeplab: error: --engine ray needs Ray Data: pip install "deeplab-cli[ray]"'
    ]
    assert not list(tmp_path.iterdir())
