import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# gcsfs >= 2026.x probes every bucket over gRPC (zonal/HNS buckets); the GCS emulator of
# tests/test_gcs.py speaks only the JSON API. Set before Ray starts so its workers inherit it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import socket  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import pytest  # noqa: E402

from tests.models import MICRO_CONFIG, register_test_models, save_micro_checkpoint  # noqa: E402

register_test_models()

S3_CREDENTIALS = {"key": "testing", "secret": "testing"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_on_loopback(make_server: Callable[[int], Any]) -> Iterator[str]:
    """For a fixture to ``yield from``: the server ``make_server(port)`` builds on a free 127.0.0.1
    port, started; its URL is yielded, then the server is stopped."""
    port = free_port()
    server = make_server(port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory) -> str:
    return str(save_micro_checkpoint(tmp_path_factory.mktemp("model") / "gemtest-micro.pt"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto) on loopback, as s3fs's own tests use."""
    from moto.server import ThreadedMotoServer
    yield from serve_on_loopback(lambda port: ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the in-process pipeline tests."""
    import ray
    # address="local": always a new cluster, never one another process on this machine started
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="gemlabel", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def base_config(micro_checkpoint, tmp_path) -> dict:
    """Config keys for a small, fast, deterministic run on the micro model."""
    return {
        "output": str(tmp_path / "out"), "vocab": ["person", "dog", "sofa", "car"],
        "model": "gemtest-micro", "pretrained": micro_checkpoint, "model_config": str(MICRO_CONFIG),
        "gem": {"depth": 3}, "input_size": [128, 128], "batch_size": 4, "cpus_per_worker": 0.5,
        "decode_threads": 2, "progress": False,
    }


@pytest.fixture(scope="session")
def labelled_output(ray_session, micro_checkpoint, tmp_path_factory) -> str:
    """A real output (2 photo shards + one with broken samples) for the show/export tests, made once."""
    from pipeline.config import load_config
    from pipeline.driver.run import run_labeling
    from tests.shards import encode, photo, write_shard, write_shards

    root = tmp_path_factory.mktemp("labelled")
    shards = write_shards(root / "in", shards=2, per_shard=5, stem="train")
    mixed = write_shard(root / "in" / "val-0000.tar", [
        {"__key__": "v-ok", "jpg": encode(photo(1, (120, 90)), "JPEG")},
        {"__key__": "v-garbage", "jpg": b"\xff\xd8 not really"},
        {"__key__": "v-ok2", "png": encode(photo(2, (100, 100)), "PNG")},
    ])
    config = load_config(None, {
        "input": [*map(str, shards), str(mixed)], "output": str(root / "out"), "vocab": ["person", "dog", "sofa", "car"],
        "model": "gemtest-micro", "pretrained": micro_checkpoint, "model_config": str(MICRO_CONFIG),
        "gem": {"depth": 3}, "input_size": [64, 64], "batch_size": 4, "cpus_per_worker": 0.5,
        "decode_threads": 2, "progress": False})
    summary = run_labeling(config)
    assert summary.shards_done == 3 and summary.shards_failed == 0
    return config.output
