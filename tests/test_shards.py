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
    listing.write_text(f"# two shards\n{tmp_path / 'a-002.tar'}\n\n{tmp_path / 'b-000.tar'}\n")
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


def test_names_with_glob_characters_are_taken_literally(tmp_path):
    """Issue 18.8: an existing file named exactly as given is that file; list entries are literal;
    brackets escape a glob character; HTTP query strings are not globs."""
    for name in ["photos [1].tar", "photos 1.tar", "a{1,2}.tar", "a1.tar", "a2.tar", "what?.tar", "whatX.tar"]:
        (tmp_path / name).write_bytes(b"x")
    for name in ["photos [1].tar", "a{1,2}.tar", "what?.tar"]:
        assert [s.url for s in list_shards([Location(str(tmp_path / name))])] == [str(tmp_path / name)]
    assert [s.url for s in list_shards([Location(str(tmp_path / "a{1,2}x.tar"))])] == [
        str(tmp_path / "a1x.tar"), str(tmp_path / "a2x.tar")]  # no such file: braces expand (missing shards)
    assert [s.url for s in list_shards([Location(str(tmp_path / "what[?].tar"))])] == [str(tmp_path / "what?.tar")]
    assert [s.url for s in list_shards([Location(str(tmp_path / "photos [[]1].tar"))])] == [
        str(tmp_path / "photos [1].tar")]
    listing = tmp_path / "list.txt"
    listing.write_text("photos [1].tar\na{1,2}.tar\nwhat?.tar\nb-*.tar\n")
    assert [s.url for s in list_shards([Location(str(listing))])] == [
        str(tmp_path / n) for n in ["photos [1].tar", "a{1,2}.tar", "what?.tar", "b-*.tar"]]  # the last: missing
    url = "http://127.0.0.1:9/x.tar?version=2"
    assert [s.url for s in list_shards([Location(url)])] == [url]
