"""The read side trusts nothing it did not check (issue 18): flat names that never collide, an
export folder that holds exactly one export, input shards replaced after labelling, splits that
match nothing (issue 19), Ray addresses that do not answer, and exports without a cluster
(issue 20). Real tar shards, real Parquet outputs, real exports read back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from pycocotools.coco import COCO

from jobs.cli import main
from pipeline.export.common import ExportOptions
from pipeline.export.runner import run_export
from pipeline.store.labelset import open_labelset
from pipeline.io.storage import Location
from tests.conftest import free_port
from tests.known_output import write_known_output
from tests.shards import encode, photo, write_shard

ROOT = Path(__file__).resolve().parents[1]
ODD_KEYS = ["a/b", "a__b", "x" * 250, "plain", "sub/dir/deep"]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def odd_output(tmp_path):
    (tmp_path / "shards").mkdir()
    known = write_known_output(str(tmp_path / "shards"), str(tmp_path / "out"), keys=ODD_KEYS)
    return str(tmp_path / "out"), known


def test_flat_names_never_collide_and_long_keys_export(odd_output, tmp_path):
    """Members a/b.jpg and a__b.jpg were one file in every export (`/` -> `__`), and a 250-character
    key failed its whole shard with `File name too long`."""
    output, known = odd_output
    for fmt, folder, ext in (("yolo-seg", "labels", "txt"), ("semantic", "ann_dir", "png")):
        dest = tmp_path / fmt
        assert main(["export", output, "--format", fmt, "--dest", str(dest), "--images", "--no-progress"]) == 0
        labels = list((dest / folder / "train").glob(f"*.{ext}"))
        copied = list((dest / ("img_dir" if fmt == "semantic" else "images") / "train").glob("*.jpg"))
        assert len(labels) == len(copied) == len(ODD_KEYS)
        assert all(len(p.name.encode()) <= 255 for p in labels + copied)
    dest = tmp_path / "coco"
    assert main(["export", output, "--format", "coco", "--dest", str(dest), "--images", "--no-progress"]) == 0
    coco = COCO(str(dest / "annotations" / "train.json"))
    names = [image["file_name"] for image in coco.dataset["images"]]
    assert len(set(names)) == len(names) == len(ODD_KEYS)
    for image in coco.dataset["images"]:  # each file is its own image
        with Image.open(dest / "images" / "train" / image["file_name"]) as copied:
            assert copied.size == (image["width"], image["height"])
    assert {image["sample_id"] for image in coco.dataset["images"]} == set(known)

    show = tmp_path / "show"
    assert main(["show", output, "--dest", str(show), "--pick", "random", "--count", "10"]) == 0
    picks = json.loads((show / "picks.json").read_text())
    overlays = [p["overlay"] for p in picks if p["overlay"]]
    assert len(set(overlays)) == len(overlays) == len(ODD_KEYS)
    assert all((show / name).is_file() for name in overlays)


def test_an_export_folder_holds_exactly_one_export(tmp_path, capsys):
    """Other --splits left the old split's files; a relabel with fewer shards and another
    vocabulary left the dropped shard's files beside the new classes.json."""
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    write_known_output(str(tmp_path / "shards"), output, shard_name="train-0000.tar")
    write_known_output(str(tmp_path / "shards"), output, shard_name="val-0000.tar")
    dest = tmp_path / "yolo"
    flags = ["export", output, "--format", "yolo-seg", "--dest", str(dest), "--no-progress"]
    assert main([*flags, "--splits", "train=*train-*,val=*val-*"]) == 0
    assert yaml.safe_load((dest / "data.yaml").read_text())["val"] == "images/val"
    assert len(list((dest / "labels" / "val").iterdir())) == 3
    assert main([*flags, "--splits", "train=*"]) == 0  # everything is train now
    assert not (dest / "labels" / "val").exists()
    assert len(list((dest / "labels" / "train").iterdir())) == 6
    assert "val" not in yaml.safe_load((dest / "data.yaml").read_text())

    # A done shard the labels no longer hold: its files go, the other shard's stay.
    labelset = open_labelset(Location(output))
    val_id = next(s for s, m in labelset.markers.items() if "val-" in m["shard"])
    marker_file = labelset.layout.marker_file(val_id)
    Path(marker_file.url).unlink()
    assert main([*flags, "--splits", "train=*"]) == 0
    assert len(list((dest / "labels" / "train").iterdir())) == 3
    assert not any(val_id in name for name in files_under(dest))

    # Relabelled with another vocabulary and fewer shards: the folder is emptied first.
    sem = tmp_path / "sem"
    sem_flags = ["export", output, "--format", "semantic", "--dest", str(sem), "--no-progress"]
    assert main(sem_flags) == 0
    before = files_under(sem)
    write_known_output(str(tmp_path / "shards"), output, shard_name="other-0000.tar", vocab=["a", "b", "c", "d"],
                       fingerprint="relabelled")
    train_id = next(s for s, m in labelset.markers.items() if "train-" in m["shard"])
    Path(labelset.layout.marker_file(train_id).url).unlink()
    assert main(sem_flags) == 0
    after = files_under(sem)
    assert not any(train_id in name for name in after) and any(train_id in name for name in before)
    assert json.loads((sem / "classes.json").read_text())["classes"] == ["a", "b", "c", "d"]
    assert len(list((sem / "ann_dir" / "train").iterdir())) == 3

    # A folder that is not an export is refused, nothing in it touched; a stray _done JSON is not done.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["export", output, "--format", "coco", "--dest", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a gemlabel export folder" in err
    assert files_under(mine) == {"notes.txt"}
    (sem / "_done" / "stray.json").write_text('{"shard_id": ')
    (sem / "_done" / f"{next(iter(open_labelset(Location(output)).markers))}.json").write_text("{trunc")
    assert main(sem_flags) == 0
    assert "stray.json" not in os.listdir(sem / "_done") and len(list((sem / "ann_dir" / "train").iterdir())) == 3


def test_input_replaced_after_labelling_is_that_shards_failure(tmp_path, capsys):
    """export --images copied the new pictures under the old annotations (exit 0); show crashed."""
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    write_known_output(str(tmp_path / "shards"), output, shard_name="a-0000.tar")
    write_known_output(str(tmp_path / "shards"), output, shard_name="b-0000.tar")
    time.sleep(0.01)
    write_shard(tmp_path / "shards" / "b-0000.tar",  # same keys, other pictures (50x90, not 160x120)
                [{"__key__": f"k{i}", "jpg": encode(photo(i, (50, 90)), "JPEG")} for i in range(3)])
    dest = tmp_path / "coco"
    capsys.readouterr()
    assert main(["export", output, "--format", "coco", "--dest", str(dest), "--images", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "b-0000.tar: the input shard changed since it was labelled" in out and "relabel" in out
    copied = list((dest / "images" / "train").iterdir())
    assert len(copied) == 3 and all(p.name.startswith("a-") for p in copied)
    assert all(Image.open(p).size == (160, 120) for p in copied)

    show = tmp_path / "show"
    assert main(["show", output, "--dest", str(show), "--pick", "random", "--count", "10"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "b-0000.tar: the input shard changed" in err
    picks = json.loads((show / "picks.json").read_text())
    assert sum(1 for p in picks if p["overlay"]) == 3
    assert all("changed since it was labelled" in p["error"] for p in picks if p["status"] == "error")

    (tmp_path / "shards" / "b-0000.tar").unlink()  # deleted: one line too
    assert main(["show", output, "--dest", str(show), "--pick", "random", "--count", "10"]) == 1
    assert "input shard is gone" in capsys.readouterr().err


def test_splits_that_match_nothing_are_refused(tmp_path, capsys):
    """--splits 'train=*train-*,val=*val-*' on shards named otherwise put everything in an
    undocumented split `other`, and data.yaml named one split as both train and val."""
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    write_known_output(str(tmp_path / "shards"), output)
    dest = tmp_path / "yolo"
    assert main(["export", output, "--format", "yolo-seg", "--dest", str(dest),
                 "--splits", "train=*train-*,val=*val-*"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "known-0000.tar" in err and "catch-all" in err
    assert not dest.exists()
    assert main(["export", output, "--format", "yolo-seg", "--dest", str(dest), "--no-progress",
                 "--splits", "val=*val-*,train=*"]) == 0
    data = yaml.safe_load((dest / "data.yaml").read_text())
    assert data["train"] == "images/train" and "val" not in data


@pytest.mark.parametrize("address, message", [("127.0.0.1:{port}", "nothing answers"),
                                              ("not an address", "expected HOST:PORT")])
def test_export_with_an_unreachable_ray_address_fails_at_once(tmp_path, capsys, address, message):
    """export --ray-address 127.0.0.1:9 hung (> 600 s); 'not an address' was a traceback."""
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    write_known_output(str(tmp_path / "shards"), output)
    start = time.monotonic()
    assert main(["export", output, "--format", "coco", "--dest", str(tmp_path / "coco"),
                 "--ray-address", address.format(port=free_port())]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "--ray-address" in err
    assert not (tmp_path / "coco").exists()


@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_show_and_export_dest_that_cannot_be_a_folder(tmp_path, capsys, where):
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    write_known_output(str(tmp_path / "shards"), output)
    (tmp_path / "afile").write_text("x")
    dest = {"file": tmp_path / "afile", "under-file": tmp_path / "afile" / "sub", "proc": Path("/proc/gemlabel")}[where]
    for command in (["show", output, "--dest", str(dest)], ["export", output, "--format", "coco", "--dest", str(dest)]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(dest) in err, err
    assert (tmp_path / "afile").read_text() == "x"


def test_export_runs_on_local_processes_without_a_cluster(tmp_path):
    """Without --ray-address or RAY_ADDRESS an export starts no Ray cluster (38-86 s for 23
    images on 2 cores, most of it Ray's start-up): the same per-shard work runs in local processes."""
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    for name in ("a-0000.tar", "b-0000.tar", "c-0000.tar"):
        write_known_output(str(tmp_path / "shards"), output, shard_name=name)
    dest = tmp_path / "coco"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    script = ("import sys, ray; from jobs.cli import main; code = main(sys.argv[1:]); "
              "assert not ray.is_initialized(); sys.exit(code)")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, "export", output, "--format", "coco", "--dest", str(dest),
                           "--images", "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    records = [json.loads(p.read_text()) for p in (dest / "_done").iterdir()]
    assert len(records) == 3
    assert len(COCO(str(dest / "annotations" / "train.json")).dataset["images"]) == 9
    print(f"local export of 3 shards / 9 images: {seconds:.1f}s wall")
    assert seconds < 30
    # The runner alone, asked for local processes: the same files again (a rerun skips all shards).
    labelset = open_labelset(Location(output))
    again = run_export(labelset, ExportOptions("coco", Location(str(dest)), images=True), progress=False,
                       use_ray=False)
    assert (again.shards_skipped, again.images) == (3, 9)


def test_ctrl_c_during_an_export_keeps_whole_shards_and_a_rerun_finishes(tmp_path):
    """SIGINT to the export's process group (a terminal's Ctrl-C) was a traceback: now one line,
    exit 130, every done shard whole, no temp files, and the rerun exports only the rest."""
    import signal
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    shards = 30  # enough that the signal lands with shards left even on a quiet machine
    for s in range(shards):
        write_known_output(str(tmp_path / "shards"), output, shard_name=f"s{s:02d}-0000.tar", images=6)
    dest = tmp_path / "coco"
    command = [sys.executable, "-m", "jobs.cli", "export", output, "--format", "coco", "--instances", "--images",
               "--dest", str(dest), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not ((dest / "_done").is_dir() and any((dest / "_done").iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, (out, err)
    assert err.strip().splitlines() == ["gemlabel: export interrupted; the shards exported so far are kept, "
                                        "rerun the same command to finish"]
    done = [json.loads(p.read_text()) for p in (dest / "_done").iterdir()]
    assert 1 <= len(done) < shards
    for record in done:  # whole shards: every file it lists is there
        assert all((dest / name).is_file() for name in record["files"])
    assert not [p for p in dest.rglob(".*tmp-*")]
    again = run_export(open_labelset(Location(output)), ExportOptions("coco", Location(str(dest)), instances=True,
                                                                      images=True), progress=False, use_ray=False)
    assert (again.shards_skipped, again.shards_done, again.images) == (len(done), shards - len(done), 6 * shards)


def test_a_failed_merge_step_is_recorded_and_exit_1(tmp_path):
    """Storage failing in the merge step (an S3 outage, a full disk) was a traceback: it is the
    summary's failure, exit 1, and the rerun merges again. A full disk is a file size limit here
    (RLIMIT_FSIZE): each shard's part fits, the merged COCO JSON does not."""
    import resource
    import signal
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    for s in range(4):
        write_known_output(str(tmp_path / "shards"), output, shard_name=f"s{s}-0000.tar")
    scratch = tmp_path / "scratch"
    run_export(open_labelset(Location(output)), ExportOptions("coco", Location(str(scratch))), progress=False,
               use_ray=False)
    part = max(p.stat().st_size for p in (scratch / "_parts").iterdir())
    merged = (scratch / "annotations" / "train.json").stat().st_size
    assert merged > 3 * part
    limit = 2 * part

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    dest = tmp_path / "coco"
    command = [sys.executable, "-m", "jobs.cli", "export", output, "--format", "coco", "--dest", str(dest),
               "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=full_disk)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "FAILED merge step (rerun the same command): OSError: [Errno 27] File too large" in done.stdout
    assert "Traceback" not in done.stderr
    assert len(list((dest / "_done").iterdir())) == 4 and not (dest / "annotations" / "train.json").exists()
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 exported, 4 already done" in again.stdout
    assert (dest / "annotations" / "train.json").read_bytes() == (scratch / "annotations" / "train.json").read_bytes()
    assert not [p for p in dest.rglob(".*tmp-*")]


def test_destinations_temp_files_are_removed_on_start(tmp_path):
    """A killed export or show left its temp files in the destination and later runs never
    cleaned them."""
    from tests.outputs import leftover_temp
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    write_known_output(str(tmp_path / "shards"), output)
    dest, show = tmp_path / "yolo", tmp_path / "show"
    assert main(["export", output, "--format", "yolo-seg", "--dest", str(dest), "--no-progress"]) == 0
    assert main(["show", output, "--dest", str(show)]) == 0
    temps = [leftover_temp(str(dest / "labels" / "train" / "x.txt"), time.time() - 60),
             leftover_temp(str(dest / "data.yaml"), time.time() - 60),
             leftover_temp(str(show / "overlays" / "y.png"), time.time() - 60)]
    assert main(["export", output, "--format", "yolo-seg", "--dest", str(dest), "--no-progress"]) == 0
    assert main(["show", output, "--dest", str(show)]) == 0
    assert not any(t.exists() for t in temps)


def test_show_on_a_full_disk_is_one_line_exit_1(tmp_path):
    """show on a full disk was a traceback; a file size limit (RLIMIT_FSIZE) that the gallery's
    index.html (every picture embedded) passes stands in for it."""
    import resource
    import signal
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    write_known_output(str(tmp_path / "shards"), output)
    assert main(["show", output, "--dest", str(tmp_path / "sized")]) == 0
    limit = max(p.stat().st_size for p in (tmp_path / "sized" / "overlays").iterdir()) + 1000
    assert (tmp_path / "sized" / "index.html").stat().st_size > limit

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "jobs.cli", "show", output, "--dest", str(tmp_path / "show")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=full_disk)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemlabel: error: writing the gallery to"), lines
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "show" / "index.html").exists()


def test_records_read_back_from_the_folder_remove_nothing_outside_it(tmp_path):
    """A stray done marker or _export.json naming files outside the export (absolute, ../) is not
    obeyed: only files inside the export folder are ever removed."""
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    write_known_output(str(tmp_path / "shards"), output)
    dest = tmp_path / "yolo"
    assert main(["export", output, "--format", "yolo-seg", "--dest", str(dest), "--no-progress"]) == 0
    victims = [tmp_path / "victim-abs.txt", tmp_path / "victim-rel.txt"]
    for victim in victims:
        victim.write_text("keep")
    names = [str(victims[0]), "../victim-rel.txt", "labels/../../victim-rel.txt"]
    (dest / "_done" / "gone-0000-12345678.json").write_text(json.dumps({"shard_id": "gone-0000-12345678",
                                                                        "files": names}))
    (tmp_path / "victim-marker.json").write_text("keep")  # a marker whose shard id points outside
    (dest / "_done" / "odd.json").write_text(json.dumps({"shard_id": "../../victim-marker", "files": []}))
    victims.append(tmp_path / "victim-marker.json")
    record = json.loads((dest / "_export.json").read_text())
    (dest / "_export.json").write_text(json.dumps({**record, "files": [*record["files"], *names]}))
    assert main(["export", output, "--format", "yolo-seg", "--dest", str(dest), "--no-progress"]) == 0
    assert all(victim.read_text() == "keep" for victim in victims)
    assert not (dest / "_done" / "gone-0000-12345678.json").exists() and not (dest / "_done" / "odd.json").exists()


def test_replaced_images_of_a_shard_without_a_recorded_identity_are_refused(tmp_path, capsys):
    """Outputs labelled before markers recorded the input's identity: the images' sizes still tell
    a replaced shard (80x60 annotations, 50x90 images were exported, and show crashed)."""
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    write_known_output(str(tmp_path / "shards"), output)
    labelset = open_labelset(Location(output))
    (marker_file,) = [labelset.layout.marker_file(s) for s in labelset.markers]
    marker = json.loads(Path(marker_file.url).read_text())
    Path(marker_file.url).write_text(json.dumps({**marker, "input": None}))
    write_shard(tmp_path / "shards" / "known-0000.tar",
                [{"__key__": f"k{i}", "jpg": encode(photo(i, (50, 90)), "JPEG")} for i in range(3)])
    capsys.readouterr()
    assert main(["export", output, "--format", "coco", "--dest", str(tmp_path / "coco"), "--images",
                 "--no-progress"]) == 1
    assert "is 50x90 but was labelled at 160x120; relabel" in capsys.readouterr().out
    assert not list((tmp_path / "coco").glob("images/train/*"))
    assert main(["show", output, "--dest", str(tmp_path / "show")]) == 1
    assert "is 50x90 but was labelled at 160x120" in capsys.readouterr().err
