"""Every member of every tar is accounted for, and a cut tar is a truncated shard (issue 7)."""
import io
import tarfile

import pytest

from pipeline.io.tar import ShardReadError, iter_tar_samples
from pipeline.worker.decode import decode_sample
from pipeline.io.storage import Location
from tests.shards import encode, photo, varied_samples, write_shard

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def write_members(path, members: list[tuple[str, bytes]]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def awkward_members() -> list[tuple[str, bytes]]:
    jpg, png = encode(photo(0, (40, 30)), "JPEG"), encode(photo(1, (30, 40)), "PNG")
    return [
        ("a.jpg", jpg), ("a.txt", b"caption"),          # an ordinary sample with a caption
        ("b.jpg", jpg),
        ("a.jpg", png),                                  # key a again, not adjacent
        ("x.jpg", jpg), ("x.png", png),                  # one key, two images
        ("img.v1.jpg", jpg), ("img.v2.jpg", png),        # dotted names: webdataset key "img"
        ("dup.jpg", jpg), ("dup.jpg", png),              # a repeated member name
        ("sub/c.jpg", jpg),
        ("cap.txt", b"no image here"),                   # no image: an error row
    ]


def test_every_image_gets_one_row_with_a_unique_id(tmp_path):
    shard = write_members(tmp_path / "awkward.tar", awkward_members())
    samples = list(iter_tar_samples(Location(str(shard))))
    assert [s["__uid__"] for s in samples] == ["a", "b", "a#2", "x", "x#2", "img", "img#2", "dup", "dup#2",
                                              "sub/c", "cap"]
    assert [s["__key__"] for s in samples][:4] == ["a", "b", "a", "x"]
    decoded = [decode_sample(i, raw, (32, 32), MEAN, STD) for i, raw in enumerate(samples)]
    assert [d.error is None for d in decoded] == [True] * 10 + [False]
    sizes = [(d.width, d.height) for d in decoded[:10]]
    assert sizes == [(40, 30), (40, 30), (30, 40), (40, 30), (30, 40), (40, 30), (30, 40), (40, 30), (30, 40),
                     (40, 30)]
    assert samples[0]["txt"] == b"caption" and "no image" in decoded[-1].error


def member_ends(path) -> list[int]:
    """Byte offsets where each member's data (padded to 512) ends."""
    with tarfile.open(path) as archive:
        return [m.offset_data + -(-m.size // 512) * 512 for m in archive.getmembers()]


def test_a_tar_cut_at_a_member_boundary_is_truncated(tmp_path):
    shard = write_shard(tmp_path / "s.tar", varied_samples(6))
    assert len(list(iter_tar_samples(Location(str(shard))))) == 6
    cut = member_ends(shard)[5]  # after the 3rd sample's two members, no end-of-archive blocks
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(ShardReadError, match="truncated"):
        list(iter_tar_samples(Location(str(shard))))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(ShardReadError):
        list(iter_tar_samples(Location(str(empty))))


def test_a_ground_truth_mask_rides_with_its_image_and_gets_no_row(tmp_path):
    """``key.seg.png`` is the image's mask (eval shards), not a second image to label."""
    jpg, mask = encode(photo(0, (40, 30)), "JPEG"), encode(photo(1, (40, 30)).convert("L"), "PNG")
    shard = write_members(tmp_path / "eval.tar", [("p.jpg", jpg), ("p.seg.png", mask), ("q.png", jpg)])
    samples = list(iter_tar_samples(Location(str(shard))))
    assert [s["__uid__"] for s in samples] == ["p", "q"]
    assert samples[0]["seg.png"] == mask and samples[0]["jpg"] == jpg


@pytest.mark.parametrize("names, uids", [
    (["k.jpg", "m.jpg", "k.jpg", "k#2.jpg"], ["k", "m", "k#2", "k#2#2"]),
    (["k#2.jpg", "k.jpg", "k.jpg", "k.jpg"], ["k#2", "k", "k#3", "k#4"]),
    (["k.jpg", "k.png", "k#2.jpg", "k#2.jpg", "k#2#2.jpg"], ["k", "k#2", "k#2#2", "k#2#3", "k#2#2#2"]),
])
def test_sample_ids_are_unique_whatever_the_member_names(tmp_path, names, uids):
    """Issue 18.2: a repeated key's ``key#n`` never equals another member's own key."""
    jpg = encode(photo(0, (20, 20)), "JPEG")
    shard = write_members(tmp_path / "ids.tar", [(name, jpg) for name in names])
    samples = list(iter_tar_samples(Location(str(shard))))
    assert [s["__uid__"] for s in samples] == uids
    assert len(set(uids)) == len(uids)
