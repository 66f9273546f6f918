"""The eval metric code against torchmetrics (an independent implementation) and hand-counted cases."""
import math

import numpy as np
import pytest
import torch

from gem.torchvision_shim import import_torchvision
from pipeline.quality.metrics import IGNORE_INDEX, SegmentationMetric

import_torchvision()  # torchmetrics imports torchvision
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex  # noqa: E402


def random_pairs(seed: int, num_classes: int, images: int, absent: tuple[int, ...] = (), ignore_share: float = 0.1):
    """(pred, label) pairs with ignore pixels and classes absent from both."""
    rng = np.random.default_rng(seed)
    present = [c for c in range(num_classes) if c not in absent]
    pairs = []
    for i in range(images):
        shape = (17 + 3 * i, 23 + 5 * i)
        label = rng.choice(present, size=shape).astype(np.uint8)
        pred = np.where(rng.random(shape) < 0.6, label, rng.choice(present, size=shape)).astype(np.int32)
        label[rng.random(shape) < ignore_share] = IGNORE_INDEX
        pairs.append((pred, label))
    return pairs


def ours(pairs, num_classes):
    metric = SegmentationMetric(num_classes)
    for pred, label in pairs:
        metric.update(pred, label)
    return metric.scores()


def torchmetrics_scores(pairs, num_classes):
    """Per-class IoU (absent classes: NaN via zero_division), macro IoU, per-class and micro accuracy."""
    per_class = MulticlassJaccardIndex(num_classes, average="none", ignore_index=IGNORE_INDEX, zero_division=math.nan)
    macro = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE_INDEX)
    recall = MulticlassAccuracy(num_classes, average="none", ignore_index=IGNORE_INDEX)
    micro = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX)
    for pred, label in pairs:
        p, t = torch.from_numpy(pred.astype(np.int64)).flatten(), torch.from_numpy(label.astype(np.int64)).flatten()
        for m in (per_class, macro, recall, micro):
            m.update(p, t)
    return per_class.compute().numpy(), float(macro.compute()), recall.compute().numpy(), float(micro.compute())


@pytest.mark.parametrize("seed,num_classes,absent", [(0, 5, ()), (1, 8, (2, 6)), (2, 21, (0, 4, 5, 20)), (3, 3, (1,))])
def test_random_maps_match_torchmetrics(seed, num_classes, absent):
    pairs = random_pairs(seed, num_classes, images=4, absent=absent)
    scores = ours(pairs, num_classes)
    iou, macro, recall, micro = torchmetrics_scores(pairs, num_classes)
    np.testing.assert_allclose(scores.iou, iou, rtol=1e-6, equal_nan=True)
    assert all(math.isnan(scores.iou[c]) for c in absent)  # absent from both: not counted
    assert scores.mIoU == pytest.approx(macro, rel=1e-6)  # torchmetrics' macro leaves absent classes out too
    # torchmetrics gives an absent class's accuracy 0; mmseg (and we) NaN, excluded from mAcc
    present = [c for c in range(num_classes) if c not in absent]
    np.testing.assert_allclose(scores.acc[present], recall[present], rtol=1e-6)
    assert scores.mAcc == pytest.approx(float(np.mean(recall[present])), rel=1e-6)
    assert scores.aAcc == pytest.approx(micro, rel=1e-6)


def test_accumulates_over_the_dataset_not_per_image():
    # image 1: class 0 perfect on 1 pixel; image 2: class 0 wrong on 3 pixels (pred 1)
    pairs = [(np.array([[0]]), np.array([[0]], np.uint8)),
             (np.array([[1, 1, 1]]), np.array([[0, 0, 0]], np.uint8))]
    scores = ours(pairs, 2)
    assert scores.iou[0] == pytest.approx(1 / 4)  # 1 / (4 gt + 1 pred - 1), not mean(1, 0)
    assert scores.iou[1] == 0.0 and scores.acc[0] == pytest.approx(1 / 4) and math.isnan(scores.acc[1])
    assert scores.mIoU == pytest.approx(1 / 8)  # class 1 was predicted: it counts, with IoU 0
    iou, macro, _, _ = torchmetrics_scores(pairs, 2)
    np.testing.assert_allclose(scores.iou, iou)
    assert scores.mIoU == pytest.approx(macro)


def test_hand_built_with_ignore_no_class_and_frequency_weights():
    label = np.array([[0, 0, 0, 0],
                      [1, 1, 255, 255],
                      [2, 2, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 0, 1, -1],      # -1: a pixel no class was given to
                     [1, 2, 0, 1],       # predictions on ignored pixels do not count
                     [2, 2, -1, 0]])
    scores = ours([(pred, label)], 3)
    # class 0: gt 4, pred 2 (valid pixels), tp 2 -> IoU 2/4; class 1: gt 2, pred 2, tp 1 -> 1/3;
    # class 2: gt 3, pred 3, tp 2 -> 2/4. The two -1 pixels are misses, not predictions.
    np.testing.assert_allclose(scores.iou, [2 / 4, 1 / 3, 2 / 4])
    np.testing.assert_allclose(scores.acc, [2 / 4, 1 / 2, 2 / 3])
    assert scores.aAcc == pytest.approx(5 / 9)
    assert scores.fwIoU == pytest.approx(4 / 9 * 2 / 4 + 2 / 9 * 1 / 3 + 3 / 9 * 2 / 4)
    assert scores.mIoU == pytest.approx((2 / 4 + 1 / 3 + 2 / 4) / 3)
    np.testing.assert_array_equal(scores.area_label, [4, 2, 3])
    np.testing.assert_array_equal(scores.area_pred, [2, 2, 3])


def test_points_hit_their_class_region():
    label = np.array([[0, 1, 1],
                      [2, 2, 255]], dtype=np.uint8)
    metric = SegmentationMetric(3)
    metric.update_points([(1, 0, 1), (2, 0, 1), (0, 0, 1), (0, 1, 2), (2, 1, 2), (0, 0, 0)], label)
    scores = metric.scores()
    # class 1: 2 of 3 inside; class 2: 1 point (the one on an ignored pixel is not counted); class 0: 1 of 1
    np.testing.assert_array_equal(scores.point_total, [1, 3, 1])
    np.testing.assert_array_equal(scores.point_hits, [1, 2, 1])
    assert scores.point_precision_overall == pytest.approx(4 / 5)


def test_bad_shapes_and_classes_are_refused():
    metric = SegmentationMetric(3)
    with pytest.raises(ValueError, match="differ in size"):
        metric.update(np.zeros((2, 2)), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="beyond the 3 classes"):
        metric.update(np.zeros((1, 1)), np.full((1, 1), 7, np.uint8))


def test_confusion_plot_title_fits_however_few_the_classes(tmp_path):
    """The title was one line wider than a one-class plot and was cut off at both sides."""
    import numpy as np
    from pipeline.quality.plots import confusion_figure, plot_confusion
    for classes in (1, 2, 3, 12):
        confusion = np.arange((classes + 1) ** 2).reshape(classes + 1, classes + 1)
        fig = confusion_figure(confusion, [f"class {i}" for i in range(classes)], list(range(classes)))
        fig.canvas.draw()
        title = fig.axes[0].title.get_window_extent(fig.canvas.get_renderer())
        assert 0 <= title.x0 and title.x1 <= fig.bbox.x1 and title.y1 <= fig.bbox.y1, (classes, title, fig.bbox)
    assert plot_confusion(confusion, [f"class {i}" for i in range(12)], list(range(12)),
                          tmp_path / "confusion.png").stat().st_size > 0
