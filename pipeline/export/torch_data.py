"""Train on the labels with no export step: a PyTorch ``IterableDataset`` that streams each image
from its input shard and its target from the shard's Parquet file, webdataset-style (one pass over
each tar, no per-image files written).

The done shards are dealt round-robin over (rank, DataLoader worker), so every sample is seen once
per epoch across a whole distributed job; a worker with no shard yields nothing. Targets:

- ``"detection"``: torchvision's detection format, one instance per connected component (as
  ``export --instances`` makes them): ``boxes`` float (N, 4) x0 y0 x1 y1 pixel corners, ``labels``
  int64 (class id + ``label_offset``; 1 by default, torchvision's detectors keep 0 for background),
  ``masks`` uint8 (N, H, W), ``scores`` (each instance's own, as COCO's), ``area``, ``iscrowd`` and ``sample_id``;
- ``"semantic"``: ``mask`` int64 (H, W) of class ids, ``ignore_index`` where no class is (and
  ``sample_id``).

Images are float32 (3, H, W) in [0, 1], EXIF orientation applied, at the labels' resolution;
``transform(image, target)`` may change both.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.masks.components import components, instance_score
from pipeline.io.storage import Location
from pipeline.store.labelset import LabelSet, Sample, label_mask, open_output

TARGETS = ("detection", "semantic")


def _rank_and_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """This process's place in a distributed job: given, else torch.distributed's, else the
    RANK / WORLD_SIZE a launcher (torchrun) sets, else a job of one."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class LabelStream(IterableDataset):
    """(image, target) pairs of an output's labelled images; see the module's docstring."""

    def __init__(self, output: Union[str, Location, LabelSet], target: str = "detection", *,
                 storage_options: Optional[dict] = None, classes: Optional[Iterable[Union[str, int]]] = None,
                 min_score: Optional[float] = None, shards: Optional[Iterable[str]] = None, min_area: int = 1,
                 label_offset: int = 1, ignore_index: int = 255,
                 transform: Optional[Callable[[torch.Tensor, dict], tuple[Any, Any]]] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        if target not in TARGETS:
            raise ValueError(f"target: one of {', '.join(TARGETS)}; got {target!r}")
        self.labels = open_output(output, storage_options)
        self.class_ids = self.labels.class_ids(classes)  # bad names fail here, not in a worker
        self.shard_ids = self.labels.select_shards(shards)
        self.target, self.min_score, self.min_area = target, min_score, min_area
        self.label_offset, self.ignore_index, self.transform = label_offset, ignore_index, transform
        self.rank, self.world_size = rank, world_size

    def my_shards(self) -> list[str]:
        """The shards this (rank, worker) reads: every (world size x workers)-th, round-robin."""
        rank, world = _rank_and_world(self.rank, self.world_size)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.shard_ids[rank * workers + worker::world * workers]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        classes = None if self.class_ids is None else sorted(self.class_ids)
        for sample in self.labels.samples(classes=classes, min_score=self.min_score, shards=self.my_shards()):
            image = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1).float().div_(255)
            target = self.semantic(sample) if self.target == "semantic" else self.detection(sample)
            yield self.transform(image, target) if self.transform else (image, target)

    def semantic(self, sample: Sample) -> dict:
        mask = np.full((sample.height, sample.width), self.ignore_index, dtype=np.int64)
        for label in sample.labels:  # a pixel has one class at most
            mask[label_mask(label)] = label["class_id"]
        return {"mask": torch.from_numpy(mask), "sample_id": sample.sample_id}

    def detection(self, sample: Sample) -> dict:
        masks, boxes, labels, scores = [], [], [], []
        for label in sample.labels:
            for component in components(label_mask(label), self.min_area):
                x, y, w, h = component.bbox
                masks.append(component.mask)
                boxes.append([x, y, x + w, y + h])
                labels.append(label["class_id"] + self.label_offset)
                scores.append(instance_score(label, component))
        stacked = np.stack(masks) if masks else np.zeros((0, sample.height, sample.width), dtype=bool)
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "masks": torch.from_numpy(stacked.astype(np.uint8)),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "area": torch.from_numpy(stacked.sum(axis=(1, 2)).astype(np.float32)),
                "iscrowd": torch.zeros(len(masks), dtype=torch.int64), "sample_id": sample.sample_id}


def collate_detection(batch: list[tuple[Any, Any]]) -> tuple[tuple, tuple]:
    """A DataLoader ``collate_fn`` for detection targets: (images, targets) as tuples, as
    torchvision's detectors take them (images differ in size)."""
    return tuple(zip(*batch))  # type: ignore[return-value]
