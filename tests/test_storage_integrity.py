"""Storage, listing and packing details that keep labels complete and readable (issues 7, 8):
no Ray needed; object-store cases run on the moto S3 server."""
import json
import io
import threading

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import s3fs

from jobs.cli import main
from pipeline.store.layout import OutputLayout, prepare_output
from pipeline.config import ConfigError
from pipeline.io.tar import iter_tar_samples
from pipeline.io.shards import list_shards
from pipeline.io.storage import Location, temp_path
from tests.conftest import S3_CREDENTIALS
from tests.outputs import leftover_temp
from tests.shards import encode, photo


@pytest.fixture
def s3(s3_endpoint):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS)
    options = {"s3": {"endpoint_url": s3_endpoint, **S3_CREDENTIALS}}
    return fs, options


def parquet_bytes(rows: int) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"x": list(range(rows))}), buffer)
    return buffer.getvalue()


def test_dataset_readers_skip_a_write_in_progress(tmp_path):
    labels = tmp_path / "labels"
    Location(str(labels / "a.parquet")).write_bytes_atomic(parquet_bytes(3))
    in_progress = temp_path(str(labels / "b.parquet"))  # where a worker's write is while it runs
    with open(in_progress, "wb") as handle:
        handle.write(parquet_bytes(5)[:20])
    assert len(pd.read_parquet(labels)) == 3
    assert ds.dataset(str(labels), format="parquet").count_rows() == 3


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_if_absent_has_exactly_one_winner(where, tmp_path, s3):
    fs, options = s3
    if where == "s3":
        fs.mkdir("claims")
        url = "s3://claims/_config.json"
    else:
        url = str(tmp_path / "_config.json")
    barrier, wins = threading.Barrier(8), []

    def claim(i):
        barrier.wait()
        if Location(url, options).write_bytes_if_absent(f"claim {i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1
    content = fs.cat_file(url) if where == "s3" else open(url, "rb").read()
    assert content == f"claim {wins[0]}".encode()


def test_racing_claims_on_s3_refuse_the_other_config(s3):
    fs, options = s3
    fs.mkdir("race")
    layout = OutputLayout(Location("s3://race/labels", options))
    barrier, outcomes = threading.Barrier(2), {}

    def claim(fingerprint):
        barrier.wait()
        try:
            prepare_output(layout, fingerprint, {"vocab": [fingerprint]}, False, run_id=fingerprint)
            outcomes[fingerprint] = "claimed"
        except ConfigError as err:
            outcomes[fingerprint] = str(err)

    threads = [threading.Thread(target=claim, args=(f,)) for f in ("fp-a", "fp-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o == "claimed" for o in outcomes.values()) == [False, True], outcomes
    assert any("changed: vocab" in o for o in outcomes.values())


def test_globs_match_only_tars_and_lists_resolve_relative_entries(tmp_path, s3):
    (tmp_path / "sub").mkdir()
    for name in ["00000.tar", "00000.parquet", "00000_stats.json", "sub/a.tar", "sub/b.tar"]:
        (tmp_path / name).write_bytes(b"x")
    assert [s.url for s in list_shards([Location(str(tmp_path / "*"))])] == [str(tmp_path / "00000.tar")]
    listing = tmp_path / "sub" / "list.txt"
    listing.write_text("  # indented comment\n a.tar \nb.tar\n../00000.tar\n")
    assert [s.url for s in list_shards([Location(str(listing))])] == [
        str(tmp_path / "sub" / "a.tar"), str(tmp_path / "sub" / "b.tar"), str(tmp_path / "00000.tar")]
    fs, options = s3
    fs.mkdir("lists")
    fs.pipe("lists/shards/p-0.tar", b"x")
    fs.pipe("lists/shards/all.txt", b"# shards next to me\np-0.tar\n  s3://lists/other.tar\n")
    assert [s.url for s in list_shards([Location("s3://lists/shards/all.txt", options)])] == [
        "s3://lists/shards/p-0.tar", "s3://lists/other.tar"]


def image_folder(root):
    root.mkdir()
    names = ["x.jpg", "x.png", "a.b.jpg", "a_b.jpg", "img.v1.jpg", "img.v2.jpg", "sub/x.jpg"]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(encode(photo(i, (20 + i, 20)), "PNG" if name.endswith("png") else "JPEG"))
    return names


def test_pack_keeps_every_file_and_never_overwrites(tmp_path, capsys):
    names = image_folder(tmp_path / "images")
    prefix = str(tmp_path / "shards" / "p")
    assert main(["pack", str(tmp_path / "images"), prefix, "--per-shard", "0"]) == 2
    assert "--per-shard" in capsys.readouterr().err and not (tmp_path / "shards").exists()
    assert main(["pack", str(tmp_path / "images"), prefix, "--per-shard", "4"]) == 0
    shards = sorted((tmp_path / "shards").glob("p-*.tar"))
    assert [s.name for s in shards] == [f"p-{i:06d}.tar" for i in range(2)]
    out = capsys.readouterr().out
    assert out.count(str(shards[0])) == 1 and out.count(str(shards[1])) == 1, out
    samples = [s for shard in shards for s in iter_tar_samples(Location(str(shard)))]
    keys = [s["__uid__"] for s in samples]
    assert len(samples) == len(names) and len(set(keys)) == len(names), keys
    assert all("#" not in key and "." not in key for key in keys)


def _packed_bytes(shards) -> list[bytes]:
    return sorted(s[ext] for shard in shards for s in iter_tar_samples(Location(str(shard)))
                  for ext in ("jpg", "png") if ext in s)


def test_packing_again_skips_what_is_packed_and_adds_changes_as_new_shards(tmp_path, capsys):
    """Rerunning a pack makes no second copy; a changed file goes into a new shard (the old shard
    is never rewritten) and a new file too, each exactly once."""
    names = image_folder(tmp_path / "images")
    prefix = str(tmp_path / "shards" / "p")
    assert main(["pack", str(tmp_path / "images"), prefix, "--per-shard", "4"]) == 0
    first = {p: p.read_bytes() for p in (tmp_path / "shards").glob("p-*.tar")}
    capsys.readouterr()
    assert main(["pack", str(tmp_path / "images"), prefix, "--per-shard", "4"]) == 0
    assert f"wrote 0 shard(s) with 0 file(s); skipped {len(names)} file(s) already packed" in capsys.readouterr().out
    assert sorted((tmp_path / "shards").glob("p-*.tar")) == sorted(first)

    changed = encode(photo(99, (30, 30)), "JPEG")
    (tmp_path / "images" / "x.jpg").write_bytes(changed)
    (tmp_path / "images" / "new.jpg").write_bytes(encode(photo(98, (30, 30)), "JPEG"))
    assert main(["pack", str(tmp_path / "images"), prefix, "--per-shard", "4"]) == 0
    out = capsys.readouterr().out
    assert f"with 2 file(s): {tmp_path / 'shards' / 'p-000002.tar'}; skipped {len(names) - 1}" in out
    assert out.count("p-000002.tar") == 1, out  # one shard: its path once
    assert all(path.read_bytes() == data for path, data in first.items())  # never overwritten
    added = [s for s in iter_tar_samples(Location(str(tmp_path / "shards" / "p-000002.tar")))]
    assert sorted(s["__key__"] for s in added) == ["new", "x"] and changed in [s.get("jpg") for s in added]
    record = json.loads((tmp_path / "shards" / "p-000002.packed.json").read_text())
    assert sorted(e["path"] for e in record["files"]) == ["new.jpg", "x.jpg"]


def test_shards_packed_without_a_record_are_not_packed_again(tmp_path, capsys):
    """Shards an older pack wrote (or a pack killed before its record) are read to learn what
    they hold, so packing the same folder into that prefix adds nothing."""
    image_folder(tmp_path / "images")
    prefix = str(tmp_path / "shards" / "p")
    assert main(["pack", str(tmp_path / "images"), prefix, "--per-shard", "4"]) == 0
    for record in (tmp_path / "shards").glob("*.packed.json"):
        record.unlink()
    before = _packed_bytes((tmp_path / "shards").glob("p-*.tar"))
    assert main(["pack", str(tmp_path / "images"), prefix, "--per-shard", "4"]) == 0
    assert _packed_bytes((tmp_path / "shards").glob("p-*.tar")) == before
    assert "wrote 0 shard(s)" in capsys.readouterr().out


def test_pack_to_an_object_store(tmp_path, s3, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_CREDENTIALS["key"])  # what the pack command's s3fs reads
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CREDENTIALS["secret"])
    fs, _ = s3
    fs.mkdir("packed")
    names = image_folder(tmp_path / "images")
    args = ["pack", str(tmp_path / "images"), "s3://packed/shards/p", "--per-shard", "5", "--s3-endpoint", s3_endpoint]
    assert main(args) == 0 and main(args) == 0  # the second packs nothing: all there
    assert sorted(fs.ls("packed/shards")) == [f"packed/shards/p-{i:06d}{ext}" for i in range(2)
                                              for ext in (".packed.json", ".tar")]
    options = {"s3": {"endpoint_url": s3_endpoint, **S3_CREDENTIALS}}
    samples = [s for i in range(2) for s in iter_tar_samples(Location(f"s3://packed/shards/p-{i:06d}.tar", options))]
    assert len(samples) == len(names)


def test_removing_stale_temps_survives_another_cleaner(tmp_path, monkeypatch):
    """Two workers (or a worker and a run) clearing one folder: a temp file the other removed
    first, between this one's listing and its removal, is not an error."""
    import os

    from fsspec.implementations.local import LocalFileSystem

    folder = Location(str(tmp_path))
    temps = [str(leftover_temp(str(tmp_path / "s-1.parquet"), 1000.0)) for _ in range(3)]
    listing = LocalFileSystem.ls

    def listed_then_taken(self, path, detail=True, **kwargs):
        entries = listing(self, path, detail=detail, **kwargs)
        os.remove(temps[0])  # the other cleaner
        return entries
    monkeypatch.setattr(LocalFileSystem, "ls", listed_then_taken)
    assert folder.remove_stale_temps(2000.0, of="s-1.parquet") == 2
    assert not any(os.path.exists(temp) for temp in temps)


def test_a_temp_file_that_cannot_be_removed_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    """Clearing up is best effort: a file it may not remove (another user's, a read-only mount)
    must not fail the shard or the run that was clearing up."""
    import os

    from fsspec.implementations.local import LocalFileSystem

    temps = [str(leftover_temp(str(tmp_path / "s-1.parquet"), 1000.0)) for _ in range(2)]
    removing = LocalFileSystem.rm

    def refused(self, path, *args, **kwargs):
        if path.endswith(temps[0].rsplit("/", 1)[1]):
            raise PermissionError(13, "Permission denied", path)
        return removing(self, path, *args, **kwargs)
    monkeypatch.setattr(LocalFileSystem, "rm", refused)
    assert Location(str(tmp_path)).remove_stale_temps(2000.0) == 1
    assert os.path.exists(temps[0]) and not os.path.exists(temps[1])
    assert "could not remove the leftover temp file" in caplog.text


_FULL_DISK = """
import resource, signal, sys
from pipeline.io.storage import Location
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
folder = sys.argv[1]
for write in ("write_bytes_atomic", "write_bytes_if_absent"):
    try:
        getattr(Location(folder + "/" + write + ".json"), write)(b"x" * 100_000)
    except OSError as err:
        print(write, "failed:", err.strerror)
"""


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path):
    """Issue 18.14: a write that fails (a full disk) removes its temp file, not only a failed rename."""
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path / "out")], cwd=repo,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.count("failed: File too large") == 2, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_temps_are_removed_from_a_whole_destination_tree(tmp_path):
    """For export/show: the leftover temp files anywhere under a destination, older than the start."""
    import time
    old = time.time() - 10
    left = [leftover_temp(str(tmp_path / "dest" / sub / "x.txt"), old) for sub in ("", "labels/train", "a/b/c")]
    fresh = leftover_temp(str(tmp_path / "dest/labels/y.txt"), time.time() + 60)
    (tmp_path / "dest/labels/train/keep.txt").write_text("label")
    assert Location(str(tmp_path / "dest")).remove_temps_below(time.time()) == 3
    assert not any(p.exists() for p in left) and fresh.exists() and (tmp_path / "dest/labels/train/keep.txt").exists()
    assert Location(str(tmp_path / "missing")).remove_temps_below(time.time()) == 0
