"""The labels as a Hugging Face ``datasets.Dataset``: one row per labelled image with an ``Image``
column (the image as labelled, EXIF applied) and its labels as ``objects`` (the layout of the Hub's
detection datasets), ready for ``push_to_hub``, ``with_format("torch")`` or ``to_parquet``.

``objects`` per label: ``category`` (a ``ClassLabel`` of the output's vocabulary), ``score``,
``area``, ``bbox`` (COCO x y w h), ``point`` (the peak, x y) and ``segmentation`` (COCO compressed
RLE: ``size`` [H, W], ``counts``; ``pycocotools.mask.decode`` or ``gemlabel``'s ``label_mask``).
Rows are written to the datasets cache as they are made (Arrow files), not held in memory.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Union

from pipeline.io.storage import Location
from pipeline.store.labelset import LabelSet, open_output

if TYPE_CHECKING:
    import datasets


def features(class_names: list[str]) -> "datasets.Features":
    """The dataset's schema: the one place its columns are named."""
    from datasets import ClassLabel, Features, Image, List, Value
    return Features({
        "sample_id": Value("string"), "key": Value("string"), "shard": Value("string"),
        "width": Value("int32"), "height": Value("int32"), "image": Image(),
        "objects": List({"category": ClassLabel(names=class_names), "score": Value("float32"),
                         "area": Value("int64"), "bbox": List(Value("int32"), length=4),
                         "point": List(Value("int32"), length=2),
                         "segmentation": {"size": List(Value("int32"), length=2), "counts": Value("string")}}),
    })


def _rows(labels: LabelSet, classes: Optional[tuple[int, ...]], min_score: Optional[float],
          shards: list[str]) -> Iterator[dict]:
    for sample in labels.samples(classes=classes, min_score=min_score, shards=shards):
        yield {"sample_id": sample.sample_id, "key": sample.key, "shard": sample.shard, "width": sample.width,
               "height": sample.height, "image": sample.image,
               "objects": [{"category": label["class_id"], "score": label["score"], "area": label["area"],
                            "bbox": list(label["bbox"]), "point": [label["point_x"], label["point_y"]],
                            "segmentation": {"size": list(label["rle_size"]), "counts": label["rle_counts"]}}
                           for label in sample.labels]}


def to_hf_dataset(output: Union[str, Location, LabelSet], *, storage_options: Optional[dict] = None,
                  classes: Optional[Iterable[Union[str, int]]] = None, min_score: Optional[float] = None,
                  shards: Optional[Iterable[str]] = None, cache_dir: Optional[str] = None,
                  num_proc: Optional[int] = None) -> "datasets.Dataset":
    """The output's labelled images (filtered as ``LabelSet.samples`` filters) as a Dataset;
    ``num_proc`` processes read the shards in parallel (the shards list is what datasets splits)."""
    from datasets import Dataset
    labels = open_output(output, storage_options)
    ids = labels.class_ids(classes)
    kwargs = {"labels": labels, "classes": None if ids is None else tuple(sorted(ids)), "min_score": min_score,
              "shards": labels.select_shards(shards)}  # the one list in gen_kwargs: datasets shards over it
    return Dataset.from_generator(_rows, features=features(labels.class_names), gen_kwargs=kwargs,
                                  cache_dir=cache_dir, num_proc=num_proc)
