"""The pictures of ``gemlabel show``: overlay PNGs, a contact sheet, and a single-file
``index.html`` gallery (pictures embedded as data URIs; inline CSS and script, nothing fetched).

Gallery: thumbnails in a grid, click one (or open ``index.html#<sample_id>``) to see it enlarged
to the window (small pictures by a whole factor, so each pixel stays a sharp square); filter by
class, sort by score, the chosen class's score once a class is chosen (also as
``index.html?class=dog&sort=asc``, to share a view); error rows listed with their messages.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from typing import Optional
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

from pipeline.masks.palette import hex_color
from pipeline.look.show import Pick, image_score
from pipeline.store.names import sample_stem
from pipeline.io.storage import Location


@dataclass
class Drawn:
    pick: Pick
    picture: Optional[Image.Image]   # None for error rows


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def file_stem(sample_id: str) -> str:
    return sample_stem(sample_id)


def contact_sheet(drawn: list[Drawn], columns: int = 6, cell: int = 200) -> Image.Image:
    """A grid of the pictures, each fitted in a cell with its sample id under it."""
    pictures = [d for d in drawn if d.picture is not None]
    columns = max(1, min(columns, len(pictures)))
    rows = max(1, -(-len(pictures) // columns))
    label_height = 16
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for i, item in enumerate(pictures):
        thumb = item.picture.copy()
        thumb.thumbnail((cell - 4, cell - 4))
        left, top = (i % columns) * cell, (i // columns) * (cell + label_height)
        sheet.paste(thumb, (left + (cell - thumb.width) // 2, top + (cell - thumb.height) // 2))
        draw.text((left + 3, top + cell), item.pick.row["sample_id"][-32:], fill="black", font=font)
    return sheet


_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f4f4f4;color:#222}
header{position:sticky;top:0;background:#fff;padding:8px 16px;border-bottom:1px solid #ccc;z-index:1}
header h1{font-size:18px;margin:0 0 4px}
main{display:flex;flex-wrap:wrap;gap:10px;padding:12px}
figure{margin:0;background:#fff;border:1px solid #ccc;padding:4px;cursor:zoom-in;width:220px}
figure img{display:block;max-width:220px;max-height:200px;margin:auto}
figcaption{font-size:12px;overflow-wrap:anywhere}
.chip{display:inline-block;white-space:nowrap;color:#fff;border-radius:3px;padding:0 4px;margin:1px;text-shadow:0 0 2px #000}
#errors{padding:0 16px 16px}
#errors td{border-bottom:1px solid #ddd;padding:2px 8px;font-size:13px;vertical-align:top}
#lightbox{position:fixed;inset:0;background:rgba(0,0,0,.85);display:flex;flex-direction:column;
 align-items:center;justify-content:center;z-index:2;cursor:zoom-out}
#lightbox[hidden]{display:none}
#lightbox img{image-rendering:pixelated}
#lightbox p{color:#fff;margin:4px;max-width:98vw;text-align:center}
"""

_SCRIPT = """
const grid=document.getElementById('grid'), cls=document.getElementById('cls'), sort=document.getElementById('sort');
const cards=[...grid.querySelectorAll('figure')];
function update(){
  const c=cls.value;
  cards.forEach(f=>{f.hidden=!!c && !f.dataset.classes.split('|').includes(c);});
  const key=f=>{const v=c?JSON.parse(f.dataset.scores)[c]:parseFloat(f.dataset.score||'NaN');
                 return v===null||v===undefined?NaN:v;};
  const ordered=[...cards].sort((a,b)=>sort.value==='pick'?a.dataset.order-b.dataset.order:
     (sort.value==='asc'?1:-1)*((isNaN(key(a))?-1:key(a))-(isNaN(key(b))?-1:key(b))));
  ordered.forEach(f=>grid.appendChild(f));
}
cls.onchange=update; sort.onchange=update;
const box=document.getElementById('lightbox'), big=document.getElementById('big'), cap=document.getElementById('bigcap');
function fit(){
  // to the window: a small picture by a whole factor (its pixels stay squares), a large one down
  const w=big.naturalWidth, h=big.naturalHeight; if(!w||!h) return;
  const room=Math.min(innerWidth*0.98/w, (innerHeight*0.92-cap.offsetHeight)/h);
  const scale=room>=1?Math.floor(room):room;
  big.style.width=(w*scale)+'px'; big.style.height=(h*scale)+'px'; big.dataset.scale=scale;
}
function open(f){
  cap.replaceChildren(...f.querySelector('figcaption').cloneNode(true).childNodes);  // its lines and chips
  box.hidden=false; big.onload=fit; big.src=f.querySelector('img').src; if(big.complete) fit();
}
window.addEventListener('resize',()=>{if(!box.hidden) fit();});
cards.forEach(f=>f.onclick=()=>{history.replaceState(null,'','#'+encodeURIComponent(f.dataset.sample)); open(f);});
box.onclick=()=>{box.hidden=true; history.replaceState(null,'',location.pathname);};
window.addEventListener('load',()=>{
  const params=new URLSearchParams(location.search);
  if(params.has('class')) cls.value=params.get('class');
  if(params.has('sort')) sort.value=params.get('sort');
  update();
  const imgs=[...grid.querySelectorAll('img')], ok=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;
  document.body.dataset.loaded=ok;
  document.getElementById('status').textContent=ok+' of '+imgs.length+' pictures loaded';
  const wanted=decodeURIComponent(location.hash.slice(1)), f=cards.find(c=>c.dataset.sample===wanted);
  if(f) open(f);
});
"""


def gallery_html(title: str, drawn: list[Drawn], class_names: list[str]) -> str:
    esc = html.escape
    present = sorted({l["class_id"] for d in drawn for l in d.pick.row["labels"]})
    options = "".join(f'<option value="{esc(class_names[c])}">{esc(class_names[c])}</option>' for c in present)
    cards, errors = [], []
    for order, item in enumerate(drawn):
        row = item.pick.row
        if item.picture is None:
            errors.append(f"<tr><td>{esc(row['sample_id'])}</td><td>{esc(row['shard'])}</td>"
                          f"<td>{esc(row['error'] or '')}</td></tr>")
            continue
        data = base64.b64encode(png_bytes(item.picture)).decode("ascii")
        names = [l["name"] for l in row["labels"]]
        chips = "".join(f'<span class="chip" style="background:{hex_color(l["class_id"])}">{esc(l["name"])} '
                        f'{l["score"]:.2f}</span> ' for l in row["labels"])
        score = "" if item.pick.score is None else f"{item.pick.score:.4f}"
        class_scores = json.dumps({name: image_score(row, name) for name in names})
        cards.append(f'<figure data-sample="{esc(row["sample_id"])}" data-classes="{esc("|".join(names))}" '
                     f'data-score="{score}" data-scores="{esc(class_scores)}" data-order="{order}">'
                     f'<img alt="{esc(row["sample_id"])}" src="data:image/png;base64,{data}"><figcaption>'
                     f'<span class="sample">{esc(row["sample_id"])}</span> · {item.pick.reason}'
                     f'{" · score " + score if score else ""}<br>{chips}</figcaption></figure>')
    error_table = (f'<section id="errors"><h2>Error rows ({len(errors)})</h2><table>'
                   f'<tr><th>sample</th><th>shard</th><th>error</th></tr>{"".join(errors)}</table></section>'
                   if errors else "")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_STYLE}</style>'
            f'</head><body><header><h1>{esc(title)}</h1>'
            f'<label>class <select id="cls"><option value="">all</option>{options}</select></label> '
            f'<label>sort <select id="sort"><option value="pick">as picked</option>'
            f'<option value="desc">score, highest first</option><option value="asc">score, lowest first</option>'
            f'</select></label> <span id="status"></span></header>'
            f'<main id="grid">{"".join(cards)}</main>{error_table}'
            f'<div id="lightbox" hidden><img id="big" alt="enlarged"><p id="bigcap"></p></div>'
            f'<script>{_SCRIPT}</script></body></html>')


def write_gallery(dest: Location, title: str, drawn: list[Drawn], class_names: list[str]) -> dict[str, str]:
    """Overlay PNGs, contact_sheet.png, index.html and picks.json under ``dest``; returns their URLs."""
    for item in drawn:
        if item.picture is not None:
            dest.child("overlays", f"{file_stem(item.pick.row['sample_id'])}.png").write_bytes_atomic(
                png_bytes(item.picture))
    files = {"index": dest.child("index.html"), "contact_sheet": dest.child("contact_sheet.png"),
             "picks": dest.child("picks.json")}
    files["contact_sheet"].write_bytes_atomic(png_bytes(contact_sheet(drawn)))
    files["index"].write_bytes_atomic(gallery_html(title, drawn, class_names).encode())
    picks = [{"sample_id": d.pick.row["sample_id"], "pick": d.pick.reason, "score": d.pick.score,
              "status": d.pick.row["status"], "error": d.pick.row["error"],
              "overlay": None if d.picture is None else f"overlays/{file_stem(d.pick.row['sample_id'])}.png"}
             for d in drawn]
    files["picks"].write_bytes_atomic(json.dumps(picks, indent=1).encode())
    return {name: file.url for name, file in files.items()}


def gallery_link(index_url: str, sample_id: str) -> str:
    """The gallery opened on one picture at full size."""
    return f"{index_url}#{quote(sample_id, safe='')}"


def show_output(labelset, dest: Location, picks: list[str], count: int = 12, seed: int = 0,
                class_name: Optional[str] = None, alpha: float = 0.5, boxes: bool = False,
                problems: Optional[dict] = None) -> dict[str, str]:
    """Pick, fetch (one pass per shard), draw and write the gallery of an output; input shards
    whose images cannot be shown go in ``problems`` (see ``fetch_picked_images``)."""
    from pipeline.look.show import draw_overlay, fetch_picked_images, pick_samples
    chosen = pick_samples(labelset.all_rows(), picks, count, seed, class_name)
    images = fetch_picked_images(chosen, labelset, problems)
    drawn = []
    for pick in chosen:
        image = images.get(pick.row["sample_id"])
        picture = None if image is None else draw_overlay(image, pick.row["labels"], alpha, boxes)
        drawn.append(Drawn(pick, picture))
    title = f"gemlabel: {labelset.root.url}" + (f" · {class_name}" if class_name else "")
    return write_gallery(dest, title, drawn, labelset.class_names)
