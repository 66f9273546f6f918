"""Shard reading and decoding: formats, modes, EXIF, broken samples, broken shards."""
import io

import pytest
import torch
from PIL import Image

from gem.preprocess import normalize, to_rgb
from pipeline.worker.decode import PrefetchingReader, decode_sample, draft_for
from pipeline.io.tar import ShardReadError, iter_tar_samples
from pipeline.io.storage import Location
from tests.shards import encode, photo, truncate, varied_samples, write_shard

SIZE = (64, 64)
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def decode(raw: dict, index: int = 0):
    return decode_sample(index, raw, SIZE, MEAN, STD)


def test_pixels_for_the_gpu_normalise_to_the_cpu_input_exactly():
    """A GPU worker decodes to uint8 pixels and normalises on the GPU: the same input, a quarter
    of the bytes to copy."""
    for i, sample in enumerate(varied_samples(6)):
        normalised = decode_sample(i, sample, SIZE, MEAN, STD)
        pixels = decode_sample(i, sample, SIZE, MEAN, STD, normalized=False)
        assert pixels.tensor.dtype == torch.uint8 and pixels.tensor.shape == (3, 64, 64)
        assert torch.equal(normalize(pixels.tensor, MEAN, STD), normalised.tensor)
        assert (pixels.width, pixels.height, pixels.error) == (normalised.width, normalised.height, None)


def test_every_format_and_mode_decodes_to_rgb():
    samples = varied_samples(6)
    kinds = [next(k for k in s if k in ("jpg", "jpeg", "png", "webp")) for s in samples]
    assert kinds == ["jpg", "png", "webp", "png", "jpeg", "png"]
    modes = [Image.open(io.BytesIO(s[k])).mode for s, k in zip(samples, kinds)]
    assert modes == ["RGB", "L", "RGB", "RGBA", "CMYK", "I;16"]
    for i, sample in enumerate(samples):
        decoded = decode(sample, i)
        assert decoded.error is None, decoded.error
        assert decoded.tensor.shape == (3, 64, 64) and decoded.tensor.std() > 0.1
        assert (decoded.width, decoded.height) == (96 + 13 * (i % 5), 64 + 11 * (i % 7))
    sixteen_bit = Image.open(io.BytesIO(samples[5]["png"]))
    low, high = to_rgb(sixteen_bit).convert("L").getextrema()  # scaled to 8 bits, not clipped to white
    assert low < high == 255


def test_exif_orientation_is_applied():
    image = photo(0, (120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode({"__key__": "rot", "jpg": encode(image, "JPEG", exif=exif.tobytes())})
    assert (decoded.width, decoded.height) == (80, 120)


def _opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("orientation", [1, 6])
def test_jpeg_draft_decodes_large_jpegs_smaller_and_reports_their_own_size(orientation):
    """A 1600x1200 photo (shown 1200x1600 when EXIF-rotated) for a 448x336 model input decodes at
    1/2 scale: still covering the input on both sides, the same size reported, nearly the same
    input pixels."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo(2, (1600, 1200)), "JPEG", quality=90, exif=exif.tobytes())
    shown = (1600, 1200) if orientation == 1 else (1200, 1600)
    size = (336, 448) if orientation == 1 else (448, 336)  # (height, width) of the model input
    full, drafted = (decode_sample(0, {"__key__": "k", "jpg": data}, lambda h, w: size, MEAN, STD,
                                   normalized=False, jpeg_draft=draft) for draft in (False, True))
    assert (full.width, full.height) == (drafted.width, drafted.height) == shown
    assert full.tensor.shape == drafted.tensor.shape == (3, *size)
    difference = (full.tensor.float() - drafted.tensor.float()).abs()
    assert 0 < difference.mean() < 3, difference.mean()  # of 255: another decode, the same picture
    image = _opened(data)
    draft_for(image, size)
    image.load()
    assert image.size == (800, 600)  # stored orientation; shown 600x800 when rotated, >= 336x448


def test_jpeg_draft_takes_a_cameras_mpo_as_a_jpeg():
    buffer = io.BytesIO()
    photo(0, (1600, 1200)).save(buffer, "MPO", save_all=True, append_images=[photo(1, (1600, 1200))])
    image = _opened(buffer.getvalue())
    draft_for(image, (448, 448))
    image.load()
    assert (image.format, image.size) == ("MPO", (800, 600))


def test_jpeg_draft_leaves_small_jpegs_and_other_formats_as_they_are():
    small = encode(photo(3, (500, 375)), "JPEG")  # short side under the input's 448
    png = encode(photo(3, (1600, 1200)), "PNG")
    for raw in ({"__key__": "small", "jpg": small}, {"__key__": "png", "png": png}):
        full, drafted = (decode_sample(0, raw, (448, 448), MEAN, STD, normalized=False, jpeg_draft=draft)
                         for draft in (False, True))
        assert torch.equal(full.tensor, drafted.tensor) and (full.width, full.height) == (drafted.width, drafted.height)
    image = _opened(small)
    draft_for(image, (448, 448))
    image.load()
    assert image.size == (500, 375)


def test_broken_samples_become_errors_not_exceptions():
    good = encode(photo(1, (50, 40)), "JPEG")
    corrupt = good[:20] + b"\x00garbage" * 50   # header intact, body destroyed
    cases = {
        "truncated": {"jpg": good[: len(good) // 2]},
        "garbage": {"jpg": b"this is not a jpeg at all"},
        "corrupt": {"jpg": corrupt},
        "noimage": {"txt": b"only text"},
    }
    for key, raw in cases.items():
        decoded = decode({"__key__": key, **raw})
        assert decoded.error and decoded.tensor is None, key
    assert decode({"__key__": "n", "txt": b"x"}).error_kind == "no_image"
    assert decode({"__key__": "g", "jpg": b"nope"}).error_kind == "decode:UnidentifiedImageError"


def test_reader_keeps_order_and_reports_broken_shards(tmp_path):
    shard = write_shard(tmp_path / "s.tar", varied_samples(30))
    reader = PrefetchingReader(Location(str(shard)), lambda i, raw: decode(raw, i), threads=3, prefetch=4)
    keys = [s.key for s in reader]
    assert keys == [f"img{i:05d}" for i in range(30)]
    assert [r["__key__"] for r in iter_tar_samples(Location(str(shard)))] == keys
    truncate(shard, 0.5)
    with pytest.raises(ShardReadError, match="ReadError"):
        list(PrefetchingReader(Location(str(shard)), lambda i, raw: decode(raw, i), threads=2))
    with pytest.raises(ShardReadError, match="missing.tar"):
        list(iter_tar_samples(Location(str(tmp_path / "missing.tar"))))
