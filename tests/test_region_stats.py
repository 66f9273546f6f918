"""Per-class statistics accumulated on the bands' device (issue 12): the same counts, scores,
peaks and boxes as full masks give, whatever the banding, with ties settled in raster order."""
import numpy as np
import pytest
import torch

from gem import LabelingThresholds
from gem.postprocess import BACKGROUND, RegionStats, label_image


def brute_force(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> dict:
    """Per present class from its full mask: count, probability sum, peak (first in raster
    order among equal maxima), box (x, y, w, h)."""
    out = {}
    for class_id in range(num_classes):
        mask = labels == class_id
        if not mask.any():
            continue
        masked = np.where(mask, probs, -1.0).ravel()
        ys, xs = np.nonzero(mask)
        out[class_id] = dict(count=int(mask.sum()), prob_sum=float(probs[mask].astype(np.float64).sum()),
                             peak=float(masked.max()), peak_index=int(np.argmax(masked)),
                             box=(int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                  int(ys.max() - ys.min() + 1)))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_banded_statistics_equal_full_masks(seed, monkeypatch):
    if seed % 2:  # bands cut again into chunks of a few rows inside RegionStats
        monkeypatch.setattr(RegionStats, "CHUNK_PIXELS", 64)
    rng = np.random.default_rng(seed)
    height, width, classes = int(rng.integers(5, 70)), int(rng.integers(5, 90)), int(rng.integers(1, 9))
    labels = rng.integers(-1, classes, size=(height, width))
    # few distinct probabilities: many ties within and across bands
    probs = rng.choice(np.array([0.25, 0.5, 0.75, 1.0], dtype=np.float32), size=(height, width))
    stats = RegionStats(classes, width, torch.device("cpu"))
    cuts = sorted({0, height, *rng.integers(1, height, size=3).tolist()})
    for start, stop in zip(cuts[:-1], cuts[1:]):
        stats.add(start, torch.from_numpy(probs[start:stop]), torch.from_numpy(labels[start:stop]))
    result = stats.result()
    expected = brute_force(labels, probs, classes)
    assert set(np.flatnonzero(result.counts).tolist()) == set(expected)
    for class_id, want in expected.items():
        assert result.counts[class_id] == want["count"]
        assert result.prob_sums[class_id] == pytest.approx(want["prob_sum"], rel=1e-12)
        assert result.peak_prob[class_id] == want["peak"]
        assert result.peak_index[class_id] == want["peak_index"], (class_id, cuts)
        assert tuple(result.boxes[class_id]) == want["box"]


def test_a_nan_probability_is_never_a_peak():
    """As an overflowing fp16 model gives: NaN pixels still count (area, box), but the peak is the
    class's highest real probability, as the numpy statistics had it."""
    labels = np.array([[0, 0, 1], [0, 1, 1]])
    probs = np.array([[np.nan, 0.6, 0.9], [0.7, np.nan, 0.8]], dtype=np.float32)
    for chunk in (1 << 20, 3):
        stats = RegionStats(2, 3, torch.device("cpu"))
        stats.CHUNK_PIXELS = chunk
        stats.add(0, torch.from_numpy(probs), torch.from_numpy(labels))
        result = stats.result()
        assert result.counts.tolist() == [3, 3]
        assert result.peak_prob[0] == pytest.approx(0.7) and result.peak_index[0] == 3  # (x 0, y 1)
        assert result.peak_prob[1] == pytest.approx(0.9) and result.peak_index[1] == 2
        assert tuple(result.boxes[1]) == (1, 0, 2, 2)


def test_a_class_of_only_nan_probabilities_has_its_point_in_its_mask():
    """Its peak is its first pixel in raster order (a point inside its own mask, not (0, 0)) and
    its peak score is NaN, not a made-up number; a class with a real probability is unchanged."""
    labels = np.array([[0, 0, 1], [1, 1, 0]])
    probs = np.array([[0.6, 0.8, np.nan], [np.nan, np.nan, 0.7]], dtype=np.float32)
    for chunk in (1 << 20, 3, 1):  # whole band; a row at a time; the NaN class's first pixel alone
        stats = RegionStats(2, 3, torch.device("cpu"))
        stats.CHUNK_PIXELS = chunk
        stats.add(0, torch.from_numpy(probs), torch.from_numpy(labels))
        result = stats.result()
        assert result.peak_index.tolist() == [1, 2] and np.isnan(result.peak_prob[1])
        assert result.peak_prob[0] == pytest.approx(0.8)
    stats = RegionStats(2, 3, torch.device("cpu"))  # two bands: the first band's NaN pixel stays the peak
    stats.add(0, torch.from_numpy(probs[:1]), torch.from_numpy(labels[:1]))
    stats.add(1, torch.from_numpy(probs[1:]), torch.from_numpy(labels[1:]))
    assert stats.result().peak_index.tolist() == [1, 2]


def test_label_image_regions_equal_full_mask_statistics():
    torch.manual_seed(5)
    sims = torch.randn(5, 7, 9) * 0.05
    sims[:, :, :2] = 0.0  # a tied strip: equal probabilities, the peak is the first pixel in raster order
    size = (83, 121)
    labels, regions = label_image(sims, size, LabelingThresholds(logit_scale=100.0, background_threshold=0.3))
    full = torch.softmax(100.0 * torch.nn.functional.interpolate(sims[None], size=size, mode="bilinear")[0], 0)
    top_prob, top_class = full.max(0)
    top_class[top_prob < 0.3] = BACKGROUND
    np.testing.assert_array_equal(labels, top_class.numpy())
    expected = brute_force(labels, top_prob.numpy(), 5)
    assert [r.class_id for r in regions] == sorted(expected)
    for region in regions:
        want = expected[region.class_id]
        assert region.area == want["count"] and region.bbox == want["box"]
        assert region.point == (want["peak_index"] % size[1], want["peak_index"] // size[1])
        assert region.score == pytest.approx(want["prob_sum"] / want["count"], rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_statistics_on_the_gpu_equal_the_cpus():  # pragma: no cover - needs a GPU
    torch.manual_seed(6)
    sims = torch.randn(12, 28, 28) * 0.05
    thresholds = LabelingThresholds(logit_scale=100.0, background_threshold=0.2)
    cpu_labels, cpu_regions = label_image(sims, (1080, 1920), thresholds)
    gpu_labels, gpu_regions = label_image(sims.cuda(), (1080, 1920), thresholds)
    np.testing.assert_array_equal(cpu_labels, gpu_labels)
    assert [(r.class_id, r.area, r.bbox, r.point, r.rle) for r in cpu_regions] == \
        [(r.class_id, r.area, r.bbox, r.point, r.rle) for r in gpu_regions]
    for cpu, gpu in zip(cpu_regions, gpu_regions):
        assert gpu.score == pytest.approx(cpu.score, rel=1e-5)
