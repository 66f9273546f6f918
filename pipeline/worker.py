"""Label one shard end to end: read, decode, batch, GEM, post-process, RLE, write, commit.

``ShardLabeler`` is a plain class (Ray wraps it as an actor in ``pipeline.runner``): it loads the
model and the vocabulary once, then labels shard after shard. Commit order: the Parquet file,
then the stats marker, each written atomically, so a shard is either done or not started.
"""
from __future__ import annotations

import io
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

import pyarrow.parquet as pq
import torch

from gem import GEMSegmenter
from gem.loading import RANDOM_WEIGHTS
from pipeline.components import prompt_points
from pipeline.config import LabelConfig
from pipeline.encode import label_record
from pipeline.inference import segmenter_settings
from pipeline.manifest import OutputLayout, write_json
from pipeline.reader import DecodedSample, PrefetchingReader, decode_sample, error_text
from pipeline.schema import table_from_rows
from pipeline.shards import Shard
from pipeline.storage import file_identity, remove, stat_file, write_bytes_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """What every worker needs, resolved once by the driver."""

    config: LabelConfig
    class_names: list[str]
    templates: list[str]
    fingerprint: str
    contents: dict = field(default_factory=dict)  # size + hash of the checkpoint / model config files

    @property
    def source(self) -> dict:
        """Everything the fingerprint is computed from."""
        return {**self.config.fingerprint_source(self.class_names, self.templates), **self.contents}

    @property
    def run_metadata(self) -> dict:
        """What produced the labels (the fingerprinted settings), for each Parquet file's metadata."""
        return {**self.source, "fingerprint": self.fingerprint, "precision": self.config.precision}


def register_model_config(path: Optional[str]) -> None:
    """Make a custom open_clip model config known in this process (driver and each worker)."""
    if path:
        from gem.torchvision_shim import import_torchvision
        import_torchvision()
        import open_clip
        open_clip.add_model_config(path)


def load_segmenter(spec: RunSpec, device: torch.device) -> GEMSegmenter:
    config = spec.config
    register_model_config(config.model_config)
    if config.pretrained is None or config.pretrained.lower() in RANDOM_WEIGHTS:
        torch.manual_seed(0)  # random weights, but the same ones in every worker and run
    settings, inference = segmenter_settings(config)
    return GEMSegmenter.from_pretrained(config.model, config.pretrained, settings, device, config.precision,
                                        inference=inference)


class ShardLabeler:
    def __init__(self, spec: RunSpec, device: Optional[str] = None, torch_threads: Optional[int] = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.spec, self.config = spec, spec.config
        self.layout = OutputLayout(spec.config.output)
        # Ray hides the GPUs from actors that asked for none, so this follows the actor's resources.
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.segmenter = load_segmenter(spec, self.device)
        self.vocabulary = self.segmenter.vocabulary(spec.class_names, spec.templates, spec.config.background)
        self.thresholds = spec.config.thresholds

    def describe(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device),
                "torch_threads": torch.get_num_threads()}

    def _decode(self, index: int, raw: dict) -> DecodedSample:
        return decode_sample(index, raw, self.segmenter.model_size, self.segmenter.mean, self.segmenter.std)

    def _rows_for_batch(self, shard: Shard, batch: list[DecodedSample], timings: Counter) -> list[dict]:
        start = time.perf_counter()
        try:  # similarities stay on the model's device: label maps are built there too
            logits = self.segmenter.dense_logits([s.tensor for s in batch], self.vocabulary)
        except Exception as err:  # e.g. out of memory: one image at a time, then an error row
            if len(batch) == 1:
                return [self._error_row(shard, batch[0], "model", err)]
            return [row for sample in batch for row in self._rows_for_batch(shard, [sample], timings)]
        timings["model_s"] += time.perf_counter() - start
        start = time.perf_counter()
        rows = []
        for sample, sample_logits in zip(batch, logits):
            try:
                _, regions = self.segmenter.regions(sample_logits, (sample.height, sample.width), self.vocabulary,
                                                    self.thresholds, sample.tensor)
                labels = [label_record(r, self.vocabulary.class_names, self._points(r)) for r in regions]
                rows.append(self._row(shard, sample, labels=labels))
            except Exception as err:  # this image's failure only
                rows.append(self._error_row(shard, sample, "label", err))
        timings["postprocess_s"] += time.perf_counter() - start
        return rows

    def _points(self, region) -> Optional[list[dict]]:
        """Per-component prompt points when asked; None keeps the peak alone (no mask decoded)."""
        if self.config.points == "peak":
            return None
        return prompt_points(region.mask, region.point, region.peak_score, region.score,
                             self.config.points, self.config.max_points)

    @classmethod
    def _error_row(cls, shard: Shard, sample: DecodedSample, stage: str, err: Exception) -> dict:
        sample.error, sample.error_kind = f"{stage}: {error_text(err)}", f"{stage}:{type(err).__name__}"
        return cls._row(shard, sample)

    @staticmethod
    def _row(shard: Shard, sample: DecodedSample, labels: Optional[list] = None) -> dict:
        return {"sample_id": f"{shard.shard_id}/{sample.uid}", "key": sample.key, "shard": shard.url,
                "width": sample.width, "height": sample.height, "status": "error" if sample.error else "ok",
                "error": sample.error, "labels": labels or [], "_index": sample.index, "_kind": sample.error_kind}

    def label_shard(self, shard: Shard, attempt: int = 0) -> dict:
        """Label a shard and commit it; returns its stats marker. Raises ShardReadError if the
        shard cannot be read, having written nothing."""
        started, wall = datetime.now(timezone.utc), time.perf_counter()
        # Recorded before reading: a shard replaced later has another identity and is relabelled.
        input_identity = file_identity(stat_file(shard.url, self.config.storage_options))
        timings: Counter = Counter()
        rows: list[dict] = []
        batch: list[DecodedSample] = []
        reader = PrefetchingReader(shard.url, self._decode, self.config.decode_threads,
                                   prefetch=4 * self.config.batch_size, storage_options=self.config.storage_options)
        wait_start = time.perf_counter()
        for sample in reader:
            timings["read_wait_s"] += time.perf_counter() - wait_start
            if sample.error:
                rows.append(self._row(shard, sample))
            else:
                batch.append(sample)
                if len(batch) == self.config.batch_size:
                    rows += self._rows_for_batch(shard, batch, timings)
                    batch = []
            wait_start = time.perf_counter()
        if batch:
            rows += self._rows_for_batch(shard, batch, timings)
        rows.sort(key=lambda row: row["_index"])
        errors = Counter(row.pop("_kind") for row in rows if row["status"] == "error")
        for row in rows:
            row.pop("_index")
            row.pop("_kind", None)

        start = time.perf_counter()
        buffer = io.BytesIO()
        pq.write_table(table_from_rows(rows, self.spec.run_metadata), buffer, compression="zstd")
        parquet = buffer.getvalue()
        write_bytes_atomic(self.layout.labels_url(shard.shard_id), parquet, self.config.storage_options)
        timings["write_s"] += time.perf_counter() - start
        total = time.perf_counter() - wall
        marker = {
            "shard": shard.url, "shard_id": shard.shard_id, "fingerprint": self.spec.fingerprint,
            "parquet": f"labels/{shard.shard_id}.parquet", "parquet_bytes": len(parquet), "samples": len(rows),
            "input": input_identity,
            "ok": len(rows) - sum(errors.values()), "errors": sum(errors.values()),
            "labels": sum(len(row["labels"]) for row in rows), "error_histogram": dict(errors),
            "timings": {k: round(v, 4) for k, v in {**timings, "total_s": total}.items()},
            "images_per_s": round(len(rows) / total, 3) if total > 0 else None,
            "attempt": attempt, "worker": self.describe(),
            "started_at": started.isoformat(), "finished_at": datetime.now(timezone.utc).isoformat(),
        }
        write_json(self.layout.marker_url(shard.shard_id), marker, self.config.storage_options)
        remove(self.layout.failed_url(shard.shard_id), self.config.storage_options)
        return marker
