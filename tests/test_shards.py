"""Shard listing: brace patterns, globs and list files, locally and on S3."""
import pytest

from pipeline.io.shards import list_shards, shard_id_for
from pipeline.io.storage import Location
from tests.conftest import S3_CREDENTIALS


def test_braces_globs_and_list_files(tmp_path):
    for name in ["a-000.tar", "a-001.tar", "a-002.tar", "b-000.tar"]:
        (tmp_path / name).write_bytes(b"x")
    braces = list_shards([Location(str(tmp_path / "a-{000..001}.tar"))])
    assert [s.url for s in braces] == [str(tmp_path / "a-000.tar"), str(tmp_path / "a-001.tar")]
    globbed = list_shards([Location(str(tmp_path / "*-000.tar")), Location("file://" + str(tmp_path / "a-000.tar"))])
    assert [s.url for s in globbed] == [str(tmp_path / "a-000.tar"), str(tmp_path / "b-000.tar")]
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# two shards\n{tmp_path / 'a-002.tar'}\n\n{tmp_path / 'b-*.tar'}\n")
    assert [s.url for s in list_shards([Location(str(listing))])] == [str(tmp_path / "a-002.tar"),
                                                                      str(tmp_path / "b-000.tar")]
    with pytest.raises(ValueError, match="matches no file"):
        list_shards([Location(str(tmp_path / "c-*.tar"))])


def test_shard_ids_are_stable_and_unique_across_folders():
    assert shard_id_for("/data/x/train-0001.tar") == shard_id_for("/data/x/train-0001.tar")
    assert shard_id_for("/data/x/train-0001.tar") != shard_id_for("/data/y/train-0001.tar")
    assert shard_id_for("s3://b/train-0001.tar").startswith("train-0001-")


def test_s3_globs_and_braces(s3_endpoint):
    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS)
    fs.mkdir("listing")
    for name in ["p-0.tar", "p-1.tar", "q-0.tar"]:
        fs.pipe(f"listing/{name}", b"x")
    fs.pipe("listing/list.txt", b"s3://listing/q-0.tar\n")
    options = {"s3": {"endpoint_url": s3_endpoint, **S3_CREDENTIALS}}
    assert [s.url for s in list_shards([Location("s3://listing/p-*.tar", options)])] == ["s3://listing/p-0.tar",
                                                                               "s3://listing/p-1.tar"]
    assert [s.url for s in list_shards([Location("s3://listing/{p,q}-0.tar", options)])] == ["s3://listing/p-0.tar",
                                                                                   "s3://listing/q-0.tar"]
    assert [s.url for s in list_shards([Location("s3://listing/list.txt", options)])] == ["s3://listing/q-0.tar"]
