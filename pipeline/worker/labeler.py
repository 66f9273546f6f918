"""Label one shard end to end: read, decode, batch, GEM, post-process, RLE, write, commit.

``ShardLabeler`` is a plain class (Ray wraps it as an actor in ``pipeline.driver.pool``): it loads the
model once and gets the vocabulary's embeddings once (encoded, from OUT/_cache, or from another
worker through Ray's object store), then labels shard after shard, its stages overlapping on
threads (``pipeline.worker.stages``) with batches fed to the device by ``pipeline.worker.device_feed``.
Commit order: the Parquet file, then the stats marker, each written atomically, so a shard is
either done or not started.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from gem import GEMSegmenter
from gem.loading import RANDOM_WEIGHTS, load_clip
from gem.vfm import load_vfm
from gem.postprocess import class_regions
from gem.vocabulary import Vocabulary
from pipeline.masks.components import instance_scores, prompt_points
from pipeline.config import LabelConfig
from pipeline.worker.device_feed import DeviceFeeder, gpu_ready_jpeg, resolve_decode
from pipeline.store.rle import label_record
from pipeline.worker.inference import segmenter_settings
from pipeline.worker.refine import RefineInputs, embed_batch, load_refiner, sam_image_of
from pipeline.store.layout import OutputLayout, write_json
from pipeline.store.marker import shard_marker
from pipeline.worker.decode import DecodedSample, decode_sample
from pipeline.io.tar import error_text, iter_tar_samples
from pipeline.store.schema import table_from_rows
from pipeline.io.shards import Shard
from pipeline.config.sizing import Sizing, local_sizing
from pipeline.worker.stages import ReadingTurns, ShardStages, StageSettings
from pipeline.io.redact import redact_url
from pipeline.io.storage import file_identity
from pipeline.worker.text_cache import (cache_source, check_rows, probe_words, read_cached, source_key,
                                        text_cache_file, write_cached)
from pipeline.worker.progress import ShardProgress, progress_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """What every worker needs, resolved once by the driver."""

    config: LabelConfig
    class_names: list[str]
    templates: list[str]
    fingerprint: str
    contents: dict = field(default_factory=dict)  # size + hash of the checkpoint / model config files
    # labels carry ``instances`` (per-component scores); False only to continue an output begun
    # before they existed, whose files must keep one schema (``plan.build_spec`` decides)
    instances: bool = True

    @property
    def source(self) -> dict:
        """Everything the fingerprint is computed from."""
        return spec_source(self.config, self.class_names, self.templates, self.contents, self.instances)

    @property
    def run_metadata(self) -> dict:
        """What produced the labels (the fingerprinted settings), for each Parquet file's metadata."""
        return {**self.source, "fingerprint": self.fingerprint, "precision": self.config.precision}


def spec_source(config: LabelConfig, class_names: list, templates: list[str], contents: dict,
                instances: bool) -> dict:
    """The fingerprint's source; ``label_fields`` only for outputs with ``instances``, so those
    begun before keep their fingerprint (and are continued without them)."""
    source = {**config.fingerprint_source(class_names, templates), **contents}
    return {**source, "label_fields": ["instances"]} if instances else source


def register_model_config(path: Optional[str]) -> None:
    """Make a custom open_clip model config known in this process (driver and each worker)."""
    if path:
        from gem.torchvision_shim import import_torchvision
        import_torchvision()
        import open_clip
        open_clip.add_model_config(path)


def load_segmenter(spec: RunSpec, device: torch.device, batch_size: Optional[int] = None) -> GEMSegmenter:
    """The run's segmenter; ``batch_size`` (images or crops per forward) defaults to the config's
    or, unset there, the one derived from this machine."""
    config = spec.config
    register_model_config(config.model_config)
    if config.pretrained is None or config.pretrained.lower() in RANDOM_WEIGHTS:
        torch.manual_seed(0)  # random weights, but the same ones in every worker and run
    batch_size = batch_size or local_sizing(config, device.type == "cuda").batch_size
    settings, inference = segmenter_settings(config, batch_size)
    clip = load_clip(config.model, config.pretrained, device)
    vfm = None
    if config.method == "proxyclip":  # ProxyCLIP's VFM, once, on CLIP's device
        weights = config.proxyclip.vfm.weights
        if weights is None or weights.lower() in RANDOM_WEIGHTS:
            torch.manual_seed(0)
        vfm = load_vfm(config.proxyclip.vfm, device)
    return GEMSegmenter(clip, settings, device, config.precision, inference=inference, vfm=vfm)


def say(text: str) -> None:
    """A phase line on the worker's stderr (Ray shows it in the driver's terminal): loading a
    model or encoding the prompts takes minutes on a CPU, and must not be silent."""
    print(f"gemlabel: {text}", file=sys.stderr, flush=True)


def on_device(vocabulary: Vocabulary, device: torch.device) -> Vocabulary:
    """The same vocabulary with its embeddings (float32, as the similarities are) on ``device``."""
    return dataclasses.replace(vocabulary, embeddings=vocabulary.embeddings.float().to(device))


class ShardLabeler:
    def __init__(self, spec: RunSpec, device: Optional[str] = None, torch_threads: Optional[int] = None,
                 vocabulary: Optional[Vocabulary] = None, sizing: Optional[Sizing] = None,
                 run_id: Optional[str] = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.spec, self.config = spec, spec.config
        self.layout = OutputLayout(spec.config.location(spec.config.output))
        # Ray hides the GPUs from actors that asked for none, so this follows the actor's resources.
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        sizing = sizing or local_sizing(self.config, self.device.type == "cuda")
        self.run_id = run_id  # names this run's progress counts (pipeline.worker.progress)
        loading = time.perf_counter()
        say(f"loading model {self.config.model} (pretrained: {self.config.pretrained}) on {self.device}")
        self.segmenter = load_segmenter(spec, self.device, sizing.batch_size)
        self.refiner = load_refiner(self.config, self.device)  # SAM, once, on the same device (refine: sam)
        self._refine_inputs = RefineInputs(self.refiner) if self.refiner is not None else None
        say(f"model {self.config.model} loaded in {time.perf_counter() - loading:.1f}s")
        self.text_encodes, self.text_source = 0, None  # how this worker got its vocabulary
        self._vocabulary: Optional[Vocabulary] = None
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)
        self.thresholds = spec.config.thresholds
        # SAM needs the decoded pixels on the CPU: with refine, JPEGs are decoded there
        self.decode_mode = "cpu" if self.refiner is not None else resolve_decode(self.config.decode, self.device)
        self.feeder = DeviceFeeder(self.device, self.segmenter.model_size, self.segmenter.mean, self.segmenter.std,
                                   self._decode)
        self.stage_settings = StageSettings(sizing.batch_size, sizing.decode_threads, sizing.postprocess_threads)
        self._timings_lock = threading.Lock()  # post-processing threads add to one shard's timings
        # Ray may run two label_shard calls at once (shards_per_worker): they take turns at reading,
        # and one batch at a time goes to the model.
        self._reading_turns, self._model_lock = ReadingTurns(), threading.Lock()

    def describe(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device),
                "torch_threads": torch.get_num_threads(), "text_encodes": self.text_encodes,
                "text_source": self.text_source, "decode": self.decode_mode,
                "batch_size": self.stage_settings.batch_size, "decode_threads": self.stage_settings.decode_threads,
                "postprocess_threads": self.stage_settings.postprocess_threads, "refine": self.config.refine}

    def shared_vocabulary(self) -> Vocabulary:
        """The vocabulary (every class name, synonym and background name's embedding, and which
        class each belongs to) on the CPU, for the other workers: from OUT/_cache if a run already
        encoded it, else encoded here (on this worker's accelerator) and cached."""
        if self._vocabulary is None:
            config = self.config
            source = cache_source(config.model, config.pretrained, config.model_config, self.spec.class_names,
                                  self.spec.templates, self.segmenter.dtype, config.background)
            file = text_cache_file(self.layout, source_key(source))
            cached, problem = read_cached(file, source)
            if cached is not None:
                problem = check_rows(cached, self._probe(cached))
            names, templates = len(self.spec.class_names) + len(config.background), len(self.spec.templates)
            if cached is not None and problem is None:
                say(f"text embeddings read from the cache {file} ({names} names x {templates} templates: "
                    "no prompts to encode)")
                self.set_vocabulary(cached, source="cache")
            else:
                if problem:
                    log.warning("the text-embedding cache %s is not this run's vocabulary (%s): encoding it "
                                "again and rewriting it", redact_url(file.url), problem)

                def progress(done: int, total: int) -> None:
                    say(f"encoding {total} prompts ({names} names x {templates} templates): {done}/{total}")
                self.set_vocabulary(self.segmenter.vocabulary(self.spec.class_names, self.spec.templates,
                                                              config.background, progress), source="encoded")
                self.text_encodes += 1
                write_cached(file, self._vocabulary, source)
        return on_device(self._vocabulary, torch.device("cpu"))

    def set_vocabulary(self, vocabulary: Vocabulary, source: str = "shipped") -> None:
        """Use a vocabulary encoded elsewhere (another worker, through Ray's object store; the cache)."""
        self._vocabulary = on_device(vocabulary, self.device)
        self.text_source = self.text_source or source

    def _probe(self, cached: Vocabulary) -> dict[int, torch.Tensor]:
        """A few of the cached rows' words encoded again, alone (a small share of the encoding)."""
        return {index: self.segmenter.vocabulary([cached.words[index]], cached.templates).embeddings[0]
                for index in probe_words(cached)}

    @property
    def vocabulary(self) -> Vocabulary:
        if self._vocabulary is None:
            self.shared_vocabulary()
        return self._vocabulary

    def _decode(self, index: int, raw: dict) -> DecodedSample:
        """On the CPU: the normalised input; for a GPU, uint8 pixels, normalised there (DeviceFeeder)."""
        return decode_sample(index, raw, self.segmenter.model_size, self.segmenter.mean, self.segmenter.std,
                             normalized=self.device.type != "cuda", jpeg_draft=self.config.jpeg_draft,
                             refine_input=self._refine_inputs)

    def _decode_for_stages(self, index: int, raw: dict) -> DecodedSample:
        """With GPU decode, plain JPEGs go to the model thread undecoded; the rest decode here."""
        return (self.decode_mode == "gpu" and gpu_ready_jpeg(index, raw)) or self._decode(index, raw)

    def _launch(self, batch: list[DecodedSample], timings: Counter):
        """Start the model on a batch: ([(sample, dense logits | exception | None)], wait). A
        batch the model fails on (e.g. out of memory) is retried one image at a time."""
        start = time.perf_counter()
        try:  # similarities stay on the model's device: label maps are built there too
            with self._model_lock, self.feeder.on_stream():
                images, ready = self.feeder.inputs(batch)
                logits = self.segmenter.dense_logits(images, self.vocabulary)
                if self.refiner is not None:  # SAM's embeddings of the whole batch, on the same device
                    embed_batch(self.refiner, ready, self.segmenter.autocast)
                wait = self.feeder.ready()
        except Exception as err:  # e.g. out of memory: one image at a time, then an error row
            if len(batch) == 1:
                return [(batch[0], err)], None
            pairs = []
            for sample in batch:
                single, wait = self._launch([sample], timings)
                if wait is not None:
                    wait()
                pairs += single
            return pairs, None
        timings["model_s"] += time.perf_counter() - start
        kept = {id(sample) for sample in ready}  # samples left out carry a decode error
        return list(zip(ready, logits)) + [(s, None) for s in batch if id(s) not in kept], wait

    def _postprocess_row(self, shard: Shard, sample: DecodedSample, output, timings: Counter) -> dict:
        """One image's dense logits -> its row (label maps, regions, RLE); never raises."""
        if output is None:
            return self._row(shard, sample)
        if isinstance(output, Exception):
            return self._error_row(shard, sample, "model", output)
        start = time.perf_counter()
        labelled = start
        try:
            size = (sample.height, sample.width)
            if self.refiner is not None:  # SAM-refined map; its points are the refined peaks
                label_map, stats, _ = self.segmenter.refined_label_map(
                    output, size, self.vocabulary, self.refiner, None, self.thresholds, sam_image_of(sample))
                sample.refine_state = None
            else:
                label_map, stats = self.segmenter.label_map(output, size, self.vocabulary, self.thresholds,
                                                            sample.tensor)  # on the model's device
            labelled = time.perf_counter()  # the rest on the CPU: RLE, records
            labels = [label_record(r, self.vocabulary.class_names, self._points(r),
                                   self._instances(label_map, stats.pixel_prob, r))
                      for r in class_regions(label_map, stats, self.thresholds.min_area)]
            row = self._row(shard, sample, labels=labels)
        except Exception as err:  # this image's failure only
            row = self._error_row(shard, sample, "label", err)
        with self._timings_lock:
            timings["postprocess_s"] += labelled - start
            timings["rle_s"] += time.perf_counter() - labelled
        return row

    def _rows_for_batch(self, shard: Shard, batch: list[DecodedSample], timings: Counter) -> list[dict]:
        """A batch through the model and post-processing, on this thread."""
        pairs, wait = self._launch(batch, timings)
        if wait is not None:
            wait()
        return [self._postprocess_row(shard, sample, output, timings) for sample, output in pairs]

    def _instances(self, label_map: np.ndarray, pixel_prob: Optional[np.ndarray], region) -> list[dict]:
        """The region's components, each scored by its own mean probability (COCO instances)."""
        if pixel_prob is None or not self.spec.instances or not self.config.instance_scores:
            return []
        return instance_scores(label_map, pixel_prob, region.class_id, region.bbox, region.score,
                               self.thresholds.min_area)

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
        return {"sample_id": f"{shard.shard_id}/{sample.uid}", "key": sample.key, "shard": shard.shown,
                "width": sample.width, "height": sample.height, "status": "error" if sample.error else "ok",
                "error": sample.error, "labels": labels or [], "_index": sample.index, "_kind": sample.error_kind}

    def label_shard(self, shard: Shard, attempt: int = 0, redo: bool = False) -> dict:
        """Label a shard and commit it; returns its stats marker. Raises ShardReadError if the
        shard cannot be read, having written nothing. Called for two shards at once, the second
        starts reading when the first has read its last sample (``ReadingTurns``). ``redo``: a
        worker had the shard before in this run (and may have died writing it)."""
        attempt_started = time.time()
        # Recorded before reading: a shard replaced later has another identity and is relabelled.
        source = self.config.location(shard.url)
        input_identity = file_identity(source.stat())
        timings: Counter = Counter()
        progress = ShardProgress(progress_key(self.run_id, shard.shard_id) if self.run_id else None)

        def counted(row: dict) -> dict:
            progress.add(1)
            return row
        waited = time.perf_counter()
        with self._reading_turns.turn() as read_done:
            started, wall = datetime.now(timezone.utc), time.perf_counter()
            timings["read_turn_wait_s"] += wall - waited
            stages = ShardStages(self.stage_settings, self._decode_for_stages,
                                 lambda batch: self._launch(batch, timings),
                                 lambda sample, output: counted(self._postprocess_row(shard, sample, output, timings)),
                                 lambda sample: counted(self._row(shard, sample)), timings)
            rows = stages.run(iter_tar_samples(source, self.config.read_timeout_s), read_done)
        progress.publish()  # every image of the attempt, until the driver has the marker
        errors = Counter(row.pop("_kind") for row in rows if row["status"] == "error")
        for row in rows:
            row.pop("_index")
            row.pop("_kind", None)

        start = time.perf_counter()
        buffer = io.BytesIO()
        pq.write_table(table_from_rows(rows, self.spec.run_metadata, self.spec.instances), buffer,
                       compression="zstd")
        parquet = buffer.getvalue()
        committing = (self.layout.labels_file(shard.shard_id), self.layout.marker_file(shard.shard_id))
        if redo:  # a worker killed while committing this shard left temp files, older than this attempt
            for file in committing:
                file.parent.remove_stale_temps(attempt_started, of=file.name)
        committing[0].write_bytes_atomic(parquet)
        timings["write_s"] += time.perf_counter() - start
        total = time.perf_counter() - wall
        marker = shard_marker(shard.shown, shard.shard_id, self.spec.fingerprint, rows, len(parquet), errors,
                              started=started, total_s=total, timings=timings, input_identity=input_identity,
                              attempt=attempt, worker=self.describe())
        write_json(committing[1], marker)
        self.layout.failed_file(shard.shard_id).remove()
        return marker
