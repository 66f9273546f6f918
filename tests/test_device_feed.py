"""Which decoder a worker uses, and which samples the GPU decoder may take (the GPU branch itself
needs a GPU; see BENCHMARKS.md for the command that measures it)."""
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.worker.device_feed import gpu_decoder_available, gpu_ready_jpeg, resolve_decode
from tests.shards import encode, photo

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_decodes_on_the_cpu_without_a_gpu():
    assert not gpu_decoder_available(CPU)
    assert resolve_decode("auto", CPU) == "cpu"
    assert resolve_decode("cpu", CPU) == "cpu"
    if not torch.cuda.is_available():
        assert resolve_decode("auto", CUDA) == "cpu"


def test_gpu_decode_is_chosen_only_where_it_works():
    assert resolve_decode("auto", CUDA, available=True) == "gpu"
    assert resolve_decode("gpu", CUDA, available=True) == "gpu"
    assert resolve_decode("cpu", CUDA, available=True) == "cpu"
    with pytest.raises(ValueError, match="decode: gpu needs a CUDA device"):
        resolve_decode("gpu", CPU)
    with pytest.raises(ValueError, match="decode: one of auto, cpu, gpu"):
        resolve_decode("nvjpeg", CPU)


def test_config_rejects_gpu_decode_on_cpu_workers_and_unknown_decoders():
    base = {"input": ["x.tar"], "output": "out", "vocab": ["cat"]}
    assert load_config(None, base).decode == "auto"
    with pytest.raises(ConfigError, match="decode: gpu needs GPU workers"):
        load_config(None, {**base, "decode": "gpu", "device": "cpu"})
    with pytest.raises(ConfigError, match="decode: one of 'auto', 'cpu', 'gpu'; got 'fast'"):
        load_config(None, {**base, "decode": "fast"})


def test_only_plain_upright_jpegs_are_left_for_the_gpu():
    image = photo(0, (120, 90))
    plain = gpu_ready_jpeg(0, {"__key__": "a", "jpg": encode(image, "JPEG")})
    assert (plain.key, plain.width, plain.height, plain.tensor) == ("a", 120, 90, None) and plain.encoded
    assert gpu_ready_jpeg(0, {"__key__": "g", "jpeg": encode(image.convert("L"), "JPEG")}) is not None
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the CPU path applies it
    assert gpu_ready_jpeg(0, {"__key__": "r", "jpg": encode(image, "JPEG", exif=exif.tobytes())}) is None
    assert gpu_ready_jpeg(0, {"__key__": "c", "jpg": encode(image.convert("CMYK"), "JPEG")}) is None
    assert gpu_ready_jpeg(0, {"__key__": "p", "png": encode(image, "PNG")}) is None
    assert gpu_ready_jpeg(0, {"__key__": "b", "jpg": b"not a jpeg"}) is None
    assert gpu_ready_jpeg(0, {"__key__": "n", "txt": b"no image"}) is None
