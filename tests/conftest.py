import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import socket  # noqa: E402

import pytest  # noqa: E402

from tests.models import MICRO_CONFIG, register_test_models, save_micro_checkpoint  # noqa: E402

register_test_models()

S3_CREDENTIALS = {"key": "testing", "secret": "testing"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory) -> str:
    return str(save_micro_checkpoint(tmp_path_factory.mktemp("model") / "gemtest-micro.pt"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto) on loopback, as s3fs's own tests use."""
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


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
