"""Worker sizing from the node: CPUs per worker, decode and post-processing threads, batch size.

A GPU worker needs enough CPU beside it to decode, resize and RLE-encode what the GPU labels
(bench_feed: about 2 CPU ms per image for these stages with GPU-side label maps, i.e. several
cores per GPU at 2,000 images/s), so by default each GPU worker takes its share of the node's
CPUs: one core for the model thread, about a quarter of the rest for post-processing (RLE), the
remainder for decoding. A CPU worker's model uses most of its cores itself, so its threads are
fewer. Keys set in the config are kept as given.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from pipeline.config.label_config import LabelConfig

GPU_BATCH = 64        # ViT-B/16 at 448 px fills an H100 from about 32-64 images (bf16)
CPU_BATCH = 16
UNKNOWN_CPUS_PER_GPU = 8  # GPU workers requested before any GPU node has joined (autoscaling)


@dataclass(frozen=True)
class Sizing:
    cpus_per_worker: float
    decode_threads: int
    postprocess_threads: int
    batch_size: int

    @property
    def torch_threads(self) -> int:
        return max(1, int(round(self.cpus_per_worker)))


def derive_sizing(node_cpus: float, node_gpus: float, use_gpu: bool, gpus_per_worker: float = 1.0,
                  workers: int = 1, cpus_per_worker: Optional[float] = None, decode_threads: Optional[int] = None,
                  postprocess_threads: Optional[int] = None, batch_size: Optional[int] = None) -> Sizing:
    """Defaults for the keys left unset (None), from the node's CPUs and GPUs."""
    if cpus_per_worker is None:
        if use_gpu:
            per_gpu = node_cpus / node_gpus if node_gpus > 0 else UNKNOWN_CPUS_PER_GPU
            cpus_per_worker = float(max(1, math.floor(per_gpu * gpus_per_worker)))
        else:
            cpus_per_worker = float(max(1, math.floor(node_cpus / max(1, workers))))
    cores = max(1, int(cpus_per_worker))
    if use_gpu:
        spare = max(1, cores - 1)  # one core runs the model thread
        postprocess_threads = postprocess_threads or max(1, spare // 4)
        decode_threads = decode_threads or max(1, spare - postprocess_threads)
    else:  # the model's own torch threads use the worker's cores
        decode_threads = decode_threads or max(2, cores // 2)
        postprocess_threads = postprocess_threads or max(1, cores // 4)
    batch_size = batch_size or (max(1, int(GPU_BATCH * max(gpus_per_worker, 1))) if use_gpu else CPU_BATCH)
    return Sizing(cpus_per_worker, decode_threads, postprocess_threads, batch_size)


def local_sizing(config: "LabelConfig", use_gpu: bool) -> Sizing:
    """Sizing from this machine's CPUs and GPUs, for a worker started outside the pool (tests)
    and for calibrate, which runs the model in the driver."""
    import torch
    return sizing_for(config, os.cpu_count() or 1, torch.cuda.device_count(), use_gpu)


def sizing_for(config: "LabelConfig", node_cpus: float, node_gpus: float, use_gpu: bool, workers: int = 1) -> Sizing:
    """The run's sizing: the config's keys where set, derived from the node where null."""
    return derive_sizing(node_cpus, node_gpus, use_gpu, config.gpus_per_worker, workers, config.cpus_per_worker,
                         config.decode_threads, config.postprocess_threads, config.batch_size)
