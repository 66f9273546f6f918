"""gemlabel show: picking, drawing, the gallery in a real headless Chromium, local and S3 outputs."""
from __future__ import annotations

import html
import json
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
    link = gallery_link(index.as_uri(), sample_id)
    chromium("--virtual-time-budget=5000", "--window-size=900,700", f"--screenshot={shot}", link)
    scale = int(re.search(r'<img id="big"[^>]*data-scale="([0-9.]+)"',
                          chromium("--virtual-time-budget=5000", "--window-size=900,700", "--dump-dom", link))[1])
    assert scale >= 2  # a small picture: each of its pixels a scale x scale square
    screen = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    overlay = np.asarray(Image.open(dest / "overlays" / f"{sample_id.replace('/', '__')}.png").convert("RGB"))
    enlarged = overlay.repeat(scale, axis=0).repeat(scale, axis=1)
    match = cv2.matchTemplate(screen.astype(np.uint8), enlarged, cv2.TM_SQDIFF)
    _, _, (left, top), _ = cv2.minMaxLoc(match)
    on_screen = screen[top:top + enlarged.shape[0], left:left + enlarged.shape[1]]
    assert np.abs(on_screen - enlarged).max() <= 2  # the enlarged picture is on screen, pixel for pixel
    shown = on_screen[scale // 2::scale, scale // 2::scale]

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


def gallery_figures(index: Path, query: str = "") -> list[dict]:
    """The gallery's cards in page order, as the browser left them: key, shown, classes, the
    image's score and each class's."""
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", index.as_uri() + query)
    found = re.findall(r'<figure data-sample="([^"]*)" data-classes="([^"]*)" data-score="([^"]*)" '
                       r'(?:data-scores="([^"]*)")?[^>]*?( hidden="")?>', dom)
    return [{"sample": sample, "key": sample.rsplit("/", 1)[1], "shown": hidden == "", "classes": classes.split("|"),
             "score": float(score), "scores": json.loads(html.unescape(scores or "{}"))}
            for sample, classes, score, scores, hidden in found]


@needs_chromium
def test_gallery_filters_by_class_and_sorts_by_score(labelled_output, tmp_path):
    dest = tmp_path / "show"
    assert main(["show", labelled_output, "--dest", str(dest), "--count", "20", "--pick", "random"]) == 0
    everything = gallery_figures(dest / "index.html")
    assert len(everything) == 12 and all(f["shown"] for f in everything)
    cars = gallery_figures(dest / "index.html", "?class=car&sort=asc")
    shown = [f for f in cars if f["shown"]]
    assert shown and all("car" in f["classes"] for f in shown)
    assert len(shown) == sum("car" in f["classes"] for f in everything) < len(everything)
    car_scores = [f["scores"]["car"] for f in shown]
    assert car_scores == sorted(car_scores)
    descending = [f["score"] for f in gallery_figures(dest / "index.html", "?sort=desc")]
    assert descending == sorted(descending, reverse=True)


# keys as long as a camera's file names: the captions wrap
K0, K1, K2 = "k0-IMG_20240612_153045", "k1-IMG_20240612_153101", "k2-IMG_20240612_153122"
SCORED = {K0: {1: 0.9, 2: 0.2, 3: 0.2}, K1: {1: 0.5, 2: 0.9, 3: 0.9}, K2: {1: 0.7, 2: 0.5, 3: 0.5}}


@pytest.fixture(scope="module")
def scored_output(tmp_path_factory):
    """Three small photos whose dog scores run the other way round from their image scores."""
    from tests.known_output import blob_masks, write_masks_output
    from tests.shards import photo
    root = tmp_path_factory.mktemp("scored")
    (root / "shards").mkdir()
    images = {key: (photo(i, (160, 120)), blob_masks(i)) for i, key in enumerate(SCORED)}
    fields = {key: {c: {"score": v} for c, v in scores.items()} for key, scores in SCORED.items()}
    write_masks_output(str(root / "shards"), str(root / "out"), images, ["person", "dog", "diningtable", "aeroplane"],
                       label_fields=fields)
    dest = root / "show"
    assert main(["show", str(root / "out"), "--dest", str(dest), "--pick", "random", "--count", "5"]) == 0
    return dest / "index.html"


@needs_chromium
def test_gallery_sorts_a_chosen_class_by_that_classs_score(scored_output):
    by_image = [f["key"] for f in gallery_figures(scored_output, "?sort=asc")]
    assert by_image == [K0, K2, K1]
    dogs = gallery_figures(scored_output, "?class=dog&sort=asc")
    assert [f["key"] for f in dogs] == [K1, K2, K0]  # 0.5, 0.7, 0.9 (it sorted by the image's)
    assert [f["scores"]["dog"] for f in dogs] == pytest.approx([0.5, 0.7, 0.9])
    assert [f["key"] for f in gallery_figures(scored_output, "?class=dog&sort=desc")] == [K0, K2, K1]


MEASURE = """<script>
window.addEventListener('load', () => setTimeout(() => {
  const out = {split: [], captions: 0};
  document.querySelectorAll('#grid figcaption').forEach(caption => {
    out.captions++;
    const width = caption.getBoundingClientRect().width;
    const walker = document.createTreeWalker(caption, NodeFilter.SHOW_TEXT);
    for (let node; (node = walker.nextNode());) {
      for (const word of node.data.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, word.index); range.setEnd(node, word.index + word[0].length);
        const rects = [...range.getClientRects()].filter(r => r.width > 0);
        if (rects.length > 1 && rects.reduce((sum, r) => sum + r.width, 0) < width) out.split.push(word[0]);
      }
    }
  });
  const big = document.getElementById('big'), box = big.getBoundingClientRect();
  Object.assign(out, {open: !document.getElementById('lightbox').hidden, caption: document.getElementById('bigcap').innerText,
                      natural: [big.naturalWidth, big.naturalHeight], shown: [box.width, box.height],
                      window: [innerWidth, innerHeight]});
  document.body.dataset.measure = JSON.stringify(out);
}, 0));
</script>"""


@needs_chromium
def test_gallery_captions_keep_words_whole_and_the_enlarged_view_is_legible(scored_output, tmp_path):
    """Layout measured in the browser: no word that fits a caption line is split over two (the
    captions broke anywhere: "rando m"); the enlarged view keeps the caption's lines and chips
    apart ("score 0.6456aeroplane 0.50") and enlarges a small picture by a whole factor."""
    page = tmp_path / "index.html"
    page.write_text(scored_output.read_text().replace("</body>", MEASURE + "</body>"))
    first = gallery_figures(scored_output)[0]["sample"]
    dom = chromium("--virtual-time-budget=5000", "--window-size=900,700", "--dump-dom", gallery_link(page.as_uri(), first))
    measure = json.loads(html.unescape(re.search(r'data-measure="([^"]*)"', dom)[1]))
    assert measure["captions"] == 3 and measure["split"] == []
    assert measure["open"] and re.search(r"score \d\.\d{4}\s*\n\s*\w", measure["caption"]), measure["caption"]
    assert re.search(r"\ndog 0\.\d0\s+diningtable 0\.\d0\s+aeroplane 0\.\d0$", measure["caption"]), measure["caption"]
    (width, height), (shown_w, shown_h) = measure["natural"], measure["shown"]
    scale = shown_w / width
    assert scale == int(scale) >= 2 and shown_h == height * scale
    assert shown_w <= 0.98 * measure["window"][0] and shown_h <= 0.92 * measure["window"][1]
    assert (scale + 1) * height > 0.92 * measure["window"][1] - 30 or (scale + 1) * width > 0.98 * measure["window"][0]


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
