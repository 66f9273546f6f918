"""gemlabel show: picking, drawing, the gallery in a real headless Chromium, local and S3 outputs."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import s3fs
from PIL import Image

from jobs.cli import main
from pipeline.look.gallery import gallery_link
from pipeline.store.labelset import fetch_images, open_labelset
from pipeline.masks.palette import class_color
from pipeline.look.show import image_score, pick_samples
from pipeline.io.storage import Location
from tests.conftest import S3_CREDENTIALS
from tests.known_output import write_known_output
from tests.outputs import all_rows, strict_json

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")


def chromium(*args: str) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--force-device-scale-factor=1", "--allow-file-access-from-files", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.fixture(scope="module")
def known_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("known-show")
    (root / "shards").mkdir()
    return str(root / "out"), write_known_output(str(root / "shards"), str(root / "out"))


@needs_chromium
def test_gallery_in_a_browser_shows_the_class_colours(known_output, tmp_path):
    output, known = known_output
    dest = tmp_path / "show"
    alpha = 0.5
    assert main(["show", output, "--dest", str(dest), "--pick", "random", "errors", "--count", "10",
                 "--alpha", str(alpha)]) == 0
    index = dest / "index.html"

    dom = chromium("--virtual-time-budget=5000", "--dump-dom", index.as_uri())
    assert re.search(r'<body[^>]*data-loaded="3"', dom) and "3 of 3 pictures loaded" in dom
    assert "Error rows (1)" in dom and "UnidentifiedImageError" in dom and "/broken" in dom

    sample_id = sorted(known)[1]
    shot = tmp_path / "shot.png"
    chromium("--virtual-time-budget=5000", "--window-size=900,700", f"--screenshot={shot}",
             gallery_link(index.as_uri(), sample_id))
    screen = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    overlay = np.asarray(Image.open(dest / "overlays" / f"{sample_id.replace('/', '__')}.png").convert("RGB"))
    match = cv2.matchTemplate(screen.astype(np.uint8), overlay, cv2.TM_SQDIFF)
    _, _, (left, top), _ = cv2.minMaxLoc(match)
    shown = screen[top:top + overlay.shape[0], left:left + overlay.shape[1]]
    assert np.abs(shown - overlay).max() <= 2  # the enlarged picture is on screen, pixel for pixel

    shard, key = sample_id.split("/")
    shard_file = Location(next(Path(output).parent.glob("shards/*.tar")).as_posix())
    photo = np.asarray(dict(fetch_images(shard_file, [key]))[key],
                       dtype=np.float64)
    labels = {l["class_id"]: l for r in all_rows(output) if r["sample_id"] == sample_id for l in r["labels"]}
    ys, xs = np.mgrid[:photo.shape[0], :photo.shape[1]]
    for class_id, mask in known[sample_id].items():
        inside = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        px, py = labels[class_id]["point_x"], labels[class_id]["point_y"]
        inside &= ~((np.abs(ys - py) <= 12) & (xs >= px - 6))  # the point and the class name drawn over it
        expected = (1 - alpha) * photo + alpha * np.array(class_color(class_id))
        close = (np.abs(shown[:photo.shape[0], :photo.shape[1]] - expected) <= 3).all(axis=-1)
        assert inside.sum() > 100 and close[inside].mean() > 0.97, (class_id, close[inside].mean())
        untinted = (np.abs(shown[:photo.shape[0], :photo.shape[1]] - photo) <= 3).all(axis=-1)
        assert untinted[inside].mean() < 0.05
    outside = ~np.any(list(known[sample_id].values()), axis=0)
    untinted = (np.abs(shown[:photo.shape[0], :photo.shape[1]] - photo) <= 3).all(axis=-1)
    assert untinted[cv2.erode(outside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)].mean() > 0.9


def test_picks_on_a_real_output(labelled_output, tmp_path):
    rows = all_rows(labelled_output)
    first = pick_samples(rows, ["random"], 4, seed=3)
    assert [p.row["sample_id"] for p in first] == [p.row["sample_id"] for p in pick_samples(rows, ["random"], 4, seed=3)]
    assert len(first) == 4 and all(p.row["status"] == "ok" for p in first)
    lowest = pick_samples(rows, ["lowest"], 3)
    scores = sorted(image_score(r) for r in rows if r["labels"])
    assert [p.score for p in lowest] == scores[:3]
    assert [p.score for p in pick_samples(rows, ["highest"], 2)] == scores[::-1][:2]
    with_dog = pick_samples(rows, ["class"], 10, class_name="dog")
    assert with_dog and all(any(l["name"] == "dog" for l in p.row["labels"]) for p in with_dog)
    assert [p.row["key"] for p in pick_samples(rows, ["errors"], 10)] == ["v-garbage"]

    dest = tmp_path / "show"
    assert main(["show", labelled_output, "--dest", str(dest), "--pick", "highest", "errors", "--count", "5",
                 "--boxes"]) == 0
    overlays = sorted((dest / "overlays").iterdir())
    assert len(overlays) == 5
    with Image.open(dest / "contact_sheet.png") as sheet:
        assert sheet.size == (5 * 200, 200 + 16)  # five pictures in one row
    html = (dest / "index.html").read_text()
    assert html.count("<figure") == 5 and "v-garbage" in html and 'src="http' not in html
    assert main(["show", labelled_output, "--class", "unicorn"]) == 2
    assert main(["show", labelled_output, "--pick", "class"]) == 2


def test_show_reads_an_output_on_s3(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_CREDENTIALS["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CREDENTIALS["secret"])
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS)
    fs.mkdir("show-bucket")
    options = {"s3": {"endpoint_url": s3_endpoint, **S3_CREDENTIALS}}
    known = write_known_output("s3://show-bucket/shards", "s3://show-bucket/labels", storage_options=options,
                               local_tmp=tmp_path)
    assert open_labelset(Location("s3://show-bucket/labels", options)).shard_ids()
    dest = tmp_path / "show"
    assert main(["show", "s3://show-bucket/labels", "--s3-endpoint", s3_endpoint, "--dest", str(dest),
                 "--count", "5"]) == 0
    assert {p.name for p in (dest / "overlays").iterdir()} == {f"{s.replace('/', '__')}.png" for s in known}
    assert main(["show", "s3://show-bucket/nothing", "--s3-endpoint", s3_endpoint, "--dest", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@needs_chromium
def test_gallery_filters_by_class_and_sorts_by_score(labelled_output, tmp_path):
    dest = tmp_path / "show"
    assert main(["show", labelled_output, "--dest", str(dest), "--count", "20", "--pick", "random"]) == 0
    def figures(query: str) -> list[tuple[bool, str, float]]:
        dom = chromium("--virtual-time-budget=5000", "--dump-dom", (dest / "index.html").as_uri() + query)
        found = re.findall(r'<figure data-sample="[^"]*" data-classes="([^"]*)" data-score="([^"]*)"[^>]*?( hidden="")?>',
                           dom)
        return [(hidden == "", classes, float(score)) for classes, score, hidden in found]
    everything = figures("")
    assert len(everything) == 12 and all(shown for shown, _, _ in everything)
    cars = figures("?class=car&sort=asc")
    shown = [(classes, score) for visible, classes, score in cars if visible]
    assert shown and all("car" in classes.split("|") for classes, _ in shown)
    assert len(shown) == sum("car" in c.split("|") for _, c, _ in everything) < len(everything)
    scores = [score for _, _, score in cars]
    assert scores == sorted(scores)
    descending = [score for _, _, score in figures("?sort=desc")]
    assert descending == sorted(descending, reverse=True)


def test_a_nan_score_is_no_score_for_picks_and_gallery(tmp_path):
    """An overflowing model's NaN scores: the image is left out of the score rankings (NaN would
    scramble the sort) and its score is null in picks.json (NaN is not JSON)."""
    (tmp_path / "shards").mkdir()
    write_known_output(str(tmp_path / "shards"), str(tmp_path / "out"), nan_scores=True)
    rows = all_rows(str(tmp_path / "out"))
    nan_row = next(r for r in rows if r["key"] == "k0")
    assert image_score(nan_row) is None
    lowest = pick_samples(rows, ["lowest"], 10)
    assert [p.row["key"] for p in lowest] == ["k1", "k2"]
    assert main(["show", str(tmp_path / "out"), "--dest", str(tmp_path / "g"), "--pick", "random", "--count", "5"]) == 0
    picks = strict_json(tmp_path / "g" / "picks.json")
    assert {p["sample_id"].rsplit("/", 1)[1]: p["score"] for p in picks}["k0"] is None
