"""Segmenter on the real models and images: expected masks, the upsampling protocol, batching, limits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGES, VOC2012, voc_sample_ids
from PIL import Image

from deeplab_cli.errors import DeviceError, ModelNotFoundError, UsageError
from deeplab_cli.runtime import Segmenter, interpolation_matrix, upsample, upsample_labels

DM05 = "deeplabv3-mnv2-dm05-voc"
MNV2 = "deeplabv3-mnv2-voc"


@pytest.fixture(scope="module")
def dm05() -> Segmenter:
    return Segmenter(DM05, device="cpu")


@pytest.fixture(scope="module")
def mnv2() -> Segmenter:
    return Segmenter(MNV2, device="cpu")


def reference_labels(logits: np.ndarray, padded: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The protocol spelled out with torch: upsample to the padded size (align corners), crop, argmax."""
    scores = torch.nn.functional.interpolate(
        torch.from_numpy(logits)[None], size=padded, mode="bilinear", align_corners=True
    )[0, :, : size[0], : size[1]]
    return scores.argmax(0).numpy()


def with_resize(segmenter: Segmenter, resize: str | int) -> Segmenter:
    """The same sessions under another resize rule (no second model load)."""
    from deeplab_cli.runtime import effective_protocol

    other = Segmenter.__new__(Segmenter)
    other.__dict__.update(segmenter.__dict__, protocol=effective_protocol(segmenter.spec.protocol, resize))
    return other


def test_golden_mask_of_the_float_model(dm05: Segmenter) -> None:
    # tflite-support's expected output for this model (run at the file's own 257 x 257 input, so not
    # resized): pixel value = class index x 10.
    golden = np.array(Image.open(IMAGES / "segmentation_golden_rotation0.png")) // 10
    prediction = with_resize(dm05, "native").predict(IMAGES / "segmentation_input_rotation0.jpg")
    assert prediction.labels.shape == golden.shape and prediction.labels.dtype == np.uint8
    assert (prediction.labels == golden).mean() >= 0.999  # measured: 1.0
    assert {c["name"] for c in prediction.class_fractions(dm05.class_names)} == {
        "background",
        "horse",
        "person",
    }


def test_bird_mask_of_the_uint8_model(mnv2: Segmenter) -> None:
    # The expected mask came from the quantised uint8 model: borders differ a little.
    expected = np.array(Image.open(IMAGES / "bird_segmentation_mask.bmp"))
    labels = mnv2.predict(IMAGES / "bird_segmentation.bmp").labels
    assert (labels == expected).mean() >= 0.97  # measured: 0.9817
    assert (labels[expected == 3] == 3).mean() >= 0.95  # the bird itself


def test_dog_foreground_matches_the_trimap(mnv2: Segmenter) -> None:
    # dog_segmentation_mask.bmp is a pet trimap (0 = animal, 1 = background, 2 = border), not VOC ids.
    trimap = np.array(Image.open(IMAGES / "dog_segmentation_mask.bmp"))
    labels = mnv2.predict(IMAGES / "dog_segmentation.bmp").labels
    known = trimap != 2
    agreement = ((labels != 0) == (trimap == 0))[known].mean()
    assert agreement >= 0.97  # measured: 0.985


def test_labels_follow_the_protocol_exactly(mnv2: Segmenter) -> None:
    native = with_resize(mnv2, "native")
    for image_id in voc_sample_ids(3):
        prediction = native.predict(VOC2012 / "JPEGImages" / f"{image_id}.jpg", return_probs=True)
        assert prediction.padded_size == (513, 513) and prediction.logits.shape == (21, 65, 65)
        reference = reference_labels(prediction.logits, prediction.padded_size, prediction.image_size)
        assert np.array_equal(prediction.labels, reference)
        assert np.allclose(prediction.probs.sum(axis=0), 1.0, atol=1e-4)
        assert np.array_equal(prediction.probs.argmax(axis=0), prediction.labels)
        assert prediction.crop_box == (0, 0, *prediction.image_size)


def test_fast_label_path_equals_dense_upsampling(dm05: Segmenter) -> None:
    logits = dm05.predict(IMAGES / "bird_segmentation.bmp").logits  # 21 x 65 x 65 for 513 x 513
    cases = [
        ((513, 513), (513, 513)),
        ((400, 300), (400, 300)),
        ((1026, 1026), (513, 513)),
    ]  # last: shrunk 2x
    for size, input_size in cases:
        fast = upsample_labels(logits, size, input_size, (513, 513))
        _, probs = upsample(logits, size, input_size, (513, 513), return_probs=True)
        assert probs.shape == (21, *size)
        assert np.array_equal(fast, probs.argmax(axis=0))


def test_interpolation_matrix_is_align_corners() -> None:
    weights = interpolation_matrix(17, 17, 17, 3)  # logits on pixels 0, 8, 16
    assert weights.shape == (17, 3)
    assert np.allclose(weights.sum(axis=1), 1.0)
    assert (
        weights[0].tolist() == [1, 0, 0]
        and weights[8].tolist() == [0, 1, 0]
        and weights[16].tolist() == [0, 0, 1]
    )
    assert weights[4].tolist() == [0.5, 0.5, 0]


def test_predict_batch_matches_single_predictions(dm05: Segmenter) -> None:
    paths = [VOC2012 / "JPEGImages" / f"{i}.jpg" for i in voc_sample_ids(3)] + [
        IMAGES / "dog_segmentation.bmp"
    ]
    dm05.batch_size = 2
    try:
        batched = dm05.predict_batch(paths)
    finally:
        dm05.batch_size = 1
    assert len(batched) == len(paths)
    for path, prediction in zip(paths, batched, strict=True):
        single = dm05.predict(path)
        assert prediction.labels.shape == single.labels.shape
        assert (prediction.labels == single.labels).mean() >= 0.999
        assert np.allclose(prediction.logits, single.logits, atol=1e-3)


def test_array_and_pil_inputs(dm05: Segmenter) -> None:
    path = IMAGES / "segmentation_input_rotation0.jpg"
    from_path = dm05.predict(path).labels
    pil = Image.open(path)
    assert np.array_equal(dm05.predict(pil).labels, from_path)
    assert np.array_equal(dm05.predict(np.array(pil.convert("RGB"))).labels, from_path)
    with pytest.raises(UsageError):
        dm05.predict(np.zeros((4, 4, 3), np.float32))


def test_max_size_bounds_the_network_input(dm05: Segmenter) -> None:
    image = Image.open(IMAGES / "segmentation_input_rotation0.jpg").convert("RGB")  # 257 x 257
    small = with_resize(dm05, "native").predict(image).labels
    big_image = np.array(image.resize((1028, 1028), Image.BICUBIC))
    limited = Segmenter(DM05, device="cpu", max_size=257, resize="native")  # the cap alone
    prediction = limited.predict(big_image)
    assert prediction.labels.shape == (1028, 1028)
    assert prediction.input_size == (257, 257) and prediction.padded_size == (257, 257)
    upscaled = np.array(Image.fromarray(small).resize((1028, 1028), Image.NEAREST))
    assert (prediction.labels == upscaled).mean() >= 0.97


def test_onnx_path_reads_the_spec(dm05: Segmenter) -> None:
    from_file = Segmenter(Path(dm05.onnx_path), device="cpu")
    assert from_file.spec.name == DM05 and from_file.spec.num_classes == 21
    path = IMAGES / "dog_segmentation.bmp"
    assert np.array_equal(from_file.predict(path).labels, dm05.predict(path).labels)


def test_unknown_model_and_bad_options() -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        Segmenter("no-such-model")
    with pytest.raises(UsageError):
        Segmenter(DM05, batch_size=0)
    with pytest.raises(UsageError, match="invalid device"):
        Segmenter(DM05, device="tpu")


def test_cuda_without_a_gpu_is_an_error() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a CUDA provider is installed here")
    with pytest.raises(DeviceError, match="--device cuda"):
        Segmenter(DM05, device="cuda")
    assert Segmenter(DM05, device="auto").providers == ["CPUExecutionProvider"]


def test_parallel_sessions_give_the_same_labels(dm05: Segmenter) -> None:
    from concurrent.futures import ThreadPoolExecutor

    two = Segmenter(DM05, device="cpu", sessions=2)
    paths = [VOC2012 / "JPEGImages" / f"{i}.jpg" for i in voc_sample_ids(4)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(two.predict, paths))
    for path, prediction in zip(paths, results, strict=True):
        assert np.array_equal(prediction.labels, dm05.predict(path).labels)


def test_big_label_maps_do_not_materialise_class_planes(dm05: Segmenter) -> None:
    import tracemalloc

    logits = dm05.predict(IMAGES / "bird_segmentation.bmp").logits  # 21 x 65 x 65
    size = (4000, 4000)  # as if a 4000 x 4000 photo had been shrunk to 513 x 513 for the network
    tracemalloc.start()
    try:
        labels = upsample_labels(logits, size, (513, 513), (513, 513))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert labels.shape == size and labels.dtype == np.uint8
    planes = 21 * size[0] * size[1] * 4  # 1.3 GB of float32 class planes
    assert peak < planes / 16, f"peak {peak / 2**20:.0f} MB"  # measured: 41 MB (16 MB are the labels)
    small = upsample_labels(logits, (513, 513), (513, 513), (513, 513))
    coarse = np.array(Image.fromarray(small).resize(size, Image.NEAREST))
    assert (labels == coarse).mean() >= 0.98


@pytest.mark.parametrize("out_size", [(375, 500), (374, 500), (375, 501)])
def test_labels_between_grids_are_the_argmax_of_the_dense_resampling(out_size: tuple[int, int]) -> None:
    """The banded label path (exact; a shortcut when the grids are the same, as after a CRF run at the
    image's own size) against the argmax of every resampled class plane."""
    from deeplab_cli.geometry import Resampler

    scores = np.random.default_rng(3).random((21, 375, 500), dtype=np.float32)
    resampler = Resampler.between((375, 500), out_size, corners=False)
    np.testing.assert_array_equal(resampler.labels(scores), resampler.dense(scores).argmax(0))


class IdentityCRF:
    """A CRF runner that returns its input, recording what it was given (the real ones live in crf/)."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...], float]] = []

    def refine(self, image: np.ndarray, probs: np.ndarray) -> np.ndarray:
        assert image.dtype == np.uint8 and probs.dtype == np.float32
        self.calls.append((image.shape, probs.shape, float(np.abs(probs.sum(axis=0) - 1).max())))
        return probs


def test_crf_runs_on_a_bounded_grid_and_labels_come_back_full_size(dm05: Segmenter) -> None:
    from deeplab_cli.runtime import CRF_MAX_PIXELS

    photo = np.array(Image.open(IMAGES / "segmentation_input_rotation0.jpg").resize((3000, 1500)))
    runner = IdentityCRF()
    refined = dm05.predict(photo, crf=runner)
    plain = dm05.predict(photo)
    ((image_shape, probs_shape, off_one),) = runner.calls
    assert image_shape[0] * image_shape[1] <= CRF_MAX_PIXELS and probs_shape == (21, *image_shape[:2])
    assert abs(image_shape[1] / image_shape[0] - 2.0) < 0.01 and off_one < 1e-4
    assert refined.labels.shape == (1500, 3000) and refined.crf_probs.shape == probs_shape
    # an identity CRF changes nothing but the resampling grid: labels agree except along borders
    assert (refined.labels == plain.labels).mean() >= 0.995


def test_probability_bands_are_the_probabilities(dm05: Segmenter) -> None:
    path = VOC2012 / "JPEGImages" / f"{voc_sample_ids(1)[0]}.jpg"
    prediction = dm05.predict(path, return_probs=True)
    bands = list(prediction.iter_prob_bands(rows=37))
    assert [top for top, _ in bands] == list(range(0, prediction.image_size[0], 37))
    stacked = np.concatenate([band for _, band in bands], axis=1)
    assert stacked.shape == prediction.probs.shape
    assert np.allclose(stacked, prediction.probs, atol=1e-6)
    assert np.array_equal(stacked.argmax(axis=0), prediction.labels)
    small = dm05.predict(path, crf=IdentityCRF())
    crf_bands = np.concatenate([band for _, band in small.iter_prob_bands()], axis=1)
    assert np.allclose(crf_bands.sum(axis=0), 1.0, atol=1e-4)
    assert np.array_equal(crf_bands.argmax(axis=0), small.labels)


def test_scores_fuse_scales_and_flips_at_the_original_size(dm05: Segmenter) -> None:
    path = VOC2012 / "JPEGImages" / f"{voc_sample_ids(2)[1]}.jpg"
    rgb = np.array(Image.open(path).convert("RGB"))
    prediction = dm05.predict(rgb)
    single, timings = dm05.scores(rgb)
    assert single.shape == (21, *rgb.shape[:2]) and set(timings) == {"infer", "upsample"}
    assert np.array_equal(single.argmax(axis=0), prediction.labels)
    flipped, _ = dm05.scores(np.ascontiguousarray(rgb[:, ::-1]))
    both, _ = dm05.scores(rgb, flip=True)
    assert np.allclose(both, (single + flipped[:, :, ::-1]) / 2, atol=1e-4)
    half, _ = dm05.scores(rgb, scales=(0.5,))
    fused, _ = dm05.scores(rgb, scales=(0.5, 1.0))
    assert np.allclose(fused, np.maximum(half, single), atol=1e-5)
    with pytest.raises(UsageError):
        dm05.scores(rgb, scales=(0.0,))


def test_resize_override_and_protocol_record() -> None:
    from deeplab_cli import zoo
    from deeplab_cli.runtime import effective_protocol

    base = zoo.get_model(MNV2).protocol
    assert effective_protocol(base, "protocol") == base
    assert effective_protocol(base, "native").resize == "none"
    assert effective_protocol(base, 321).resize_min == effective_protocol(base, "321").resize_max == 321
    for bad in ("big", 0, -5):
        with pytest.raises(UsageError):
            effective_protocol(base, bad)
