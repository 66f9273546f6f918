"""An eval's scores as files: report.json (everything), report.md (a table), class_iou.png and
confusion.png. Percentages are rounded to 2 decimals as mmseg prints them; NaN (a class absent from
both labels and ground truth) is null in JSON and "-" in the table."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from pipeline.quality.evaluate import EvalResult
from pipeline.quality.plots import plot_class_iou, plot_confusion


def _percent(value: float) -> Optional[float]:
    return None if math.isnan(value) else round(100 * float(value), 2)


def scores_record(result: EvalResult) -> dict[str, Any]:
    scores, mapping = result.metric.scores(), result.mapping
    classes = []
    for index in mapping.evaluated:
        classes.append({
            "class": mapping.class_names[index],
            "vocab": sorted(v for v, c in mapping.vocab_to_class.items() if c == index),
            "IoU": _percent(scores.iou[index]), "Acc": _percent(scores.acc[index]),
            "gt_pixels": int(scores.area_label[index]), "pred_pixels": int(scores.area_pred[index]),
            "points": int(scores.point_total[index]), "points_hit": int(scores.point_hits[index]),
            "point_precision": _percent(scores.point_precision[index]),
        })
    return {
        "summary": {"mIoU": _percent(scores.mIoU), "mAcc": _percent(scores.mAcc), "aAcc": _percent(scores.aAcc),
                    "fwIoU": _percent(scores.fwIoU), "point_precision": _percent(scores.point_precision_overall),
                    "points": int(scores.point_total.sum())},
        "classes": classes,
        "images": {"scored": result.images_scored, "missing_labels": len(result.images_missing),
                   "label_errors": len(result.images_failed),
                   "missing_examples": result.images_missing[:10], "error_examples": result.images_failed[:10]},
        "mapping": mapping.as_dict(),
        "confusion": {"classes": mapping.class_names + ["(no class)"], "rows_gt_cols_pred": result.metric.confusion.tolist()},
    }


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(record: dict) -> str:
    summary = record["summary"]
    lines = ["| mIoU | mAcc | aAcc | fwIoU | point precision | images |", "| --- | --- | --- | --- | --- | --- |",
             f"| {_cell(summary['mIoU'])} | {_cell(summary['mAcc'])} | {_cell(summary['aAcc'])} | "
             f"{_cell(summary['fwIoU'])} | {_cell(summary['point_precision'])} ({summary['points']} points) | "
             f"{record['images']['scored']} |", "",
             "| class | vocabulary | IoU | Acc | point precision | points | GT pixels | predicted pixels |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in record["classes"]:
        lines.append(f"| {row['class']} | {', '.join(row['vocab']) or '-'} | {_cell(row['IoU'])} | {_cell(row['Acc'])} | "
                     f"{_cell(row['point_precision'])} | {row['points']} | {row['gt_pixels']} | {row['pred_pixels']} |")
    images = record["images"]
    if images["missing_labels"] or images["label_errors"]:
        lines += ["", f"Not scored: {images['missing_labels']} image(s) without labels, "
                      f"{images['label_errors']} with a labelling error."]
    return "\n".join(lines) + "\n"


def write_report(result: EvalResult, report_dir: str, extra: Optional[dict] = None) -> dict:
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {**scores_record(result), **(extra or {})}
    (out / "report.json").write_text(json.dumps(record, indent=1, allow_nan=False), encoding="utf-8")
    (out / "report.md").write_text(markdown(record), encoding="utf-8")
    scores, mapping = result.metric.scores(), result.mapping
    names = mapping.class_names
    plot_class_iou([names[i] for i in mapping.evaluated], [scores.iou[i] for i in mapping.evaluated],
                   scores.mIoU if not math.isnan(scores.mIoU) else 0.0, out / "class_iou.png")
    plot_confusion(result.metric.confusion, names, mapping.evaluated, out / "confusion.png")
    return record
