"""The labels taken straight into the tools people train with, each consumed for real: a Hugging
Face Dataset, and the PyTorch stream through a DataLoader with workers and ranks and into a
torchvision detector's training step."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

import gemlabel
from tests.known_output import CLASSES, SIZE, write_known_output


@pytest.fixture
def three_shards(tmp_path) -> tuple[str, dict]:
    """An output of 3 shards x 3 labelled images (and an error sample each)."""
    known = {}
    for i in range(3):
        (tmp_path / f"shards{i}").mkdir()
        known.update(write_known_output(str(tmp_path / f"shards{i}"), str(tmp_path / "out")))
    return str(tmp_path / "out"), known


def test_hf_dataset_has_the_images_and_labels(three_shards, tmp_path):
    datasets = pytest.importorskip("datasets")
    output, known = three_shards
    labels = gemlabel.open_output(output)
    ds = gemlabel.to_hf_dataset(output, cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["objects"].feature["category"].names == CLASSES
    assert sorted(ds["sample_id"]) == sorted(known)
    images = {s.sample_id: np.asarray(s.image) for s in labels.samples()}
    for row in ds:
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), images[row["sample_id"]])
        truth = known[row["sample_id"]]
        assert sorted(o["category"] for o in row["objects"]) == sorted(truth)
        for obj in row["objects"]:
            rle = {"size": obj["segmentation"]["size"], "counts": obj["segmentation"]["counts"].encode()}
            assert np.array_equal(mask_utils.decode(rle).astype(bool), truth[obj["category"]])
    dogs = gemlabel.to_hf_dataset(output, classes=["dog"], min_score=0.5, cache_dir=str(tmp_path / "hf"), num_proc=2)
    assert {o["category"] for row in dogs for o in row["objects"]} == {1} and len(dogs) == 9
    # push_to_hub uploads Parquet shards of the dataset: written and read back, it is the same dataset
    ds.to_parquet(str(tmp_path / "hub.parquet"))
    hub = datasets.load_dataset("parquet", data_files=str(tmp_path / "hub.parquet"), split="train",
                                cache_dir=str(tmp_path / "hf2"))
    assert hub.features == ds.features and hub[0]["sample_id"] == ds[0]["sample_id"]
    assert np.array_equal(np.asarray(hub[0]["image"]), np.asarray(ds[0]["image"]))
    torch_rows = ds.with_format("torch")
    assert torch_rows[0]["image"].shape == (3, SIZE[1], SIZE[0])  # datasets gives images channels first


def test_every_sample_once_over_dataloader_workers_and_ranks(three_shards):
    output, known = three_shards
    seen: Counter = Counter()
    for rank in range(2):  # a job of two ranks, two DataLoader workers each
        stream = gemlabel.LabelStream(output, "semantic", rank=rank, world_size=2)
        for images, targets in DataLoader(stream, batch_size=2, num_workers=2):
            assert images.shape[1:] == (3, SIZE[1], SIZE[0]) and images.dtype == torch.float32
            seen.update(targets["sample_id"])
            for sample_id, mask in zip(targets["sample_id"], targets["mask"]):
                expected = np.full((SIZE[1], SIZE[0]), 255)
                for class_id, truth in known[sample_id].items():
                    expected[truth] = class_id
                assert np.array_equal(mask.numpy(), expected)
    assert seen == Counter({sample_id: 1 for sample_id in known})
    one = Counter(t for _, batch in DataLoader(gemlabel.LabelStream(output, "semantic"), batch_size=4, num_workers=2)
                  for t in batch["sample_id"])
    assert one == seen


@pytest.mark.slow  # over 15 s on 2 cores; CI runs it (-m 'not slow' leaves it out)
def test_detection_targets_train_a_torchvision_detector(three_shards):
    from gem.torchvision_shim import import_torchvision
    torchvision = import_torchvision()
    output, known = three_shards
    stream = gemlabel.LabelStream(output, "detection")
    loader = DataLoader(stream, batch_size=2, collate_fn=gemlabel.collate_detection)
    images, targets = next(iter(loader))
    for target in targets:
        components = sum({1: 2, 2: 1, 3: 2}[c] for c in known[target["sample_id"]])  # two discs; a ring; ellipse, speck
        assert len(target["boxes"]) == len(target["masks"]) == components
        assert set(target["labels"].tolist()) == {c + 1 for c in known[target["sample_id"]]}
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = np.nonzero(mask.numpy())
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    torch.manual_seed(0)
    # RetinaNet: its training step needs none of torchvision's compiled ops (missing here)
    model = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=len(CLASSES) + 1, min_size=SIZE[1], max_size=SIZE[0])
    model.train()
    losses = model(list(images), [{k: v for k, v in t.items() if k != "sample_id"} for t in targets])
    assert set(losses) == {"classification", "bbox_regression"}
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_stream_refuses_bad_arguments_at_once(three_shards):
    output, _ = three_shards
    with pytest.raises(ValueError, match="target"):
        gemlabel.LabelStream(output, "panoptic")
    with pytest.raises(ValueError, match="unicorn"):
        gemlabel.LabelStream(output, classes=["unicorn"])
