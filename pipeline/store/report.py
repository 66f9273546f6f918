"""Summarise an output prefix from its markers (one listing of labels/ checks that each marker's
Parquet file is there with the recorded size), and with ``per_class`` its classes from the
Parquet files' score, area and class columns (``class_stats``)."""
from __future__ import annotations

from collections import Counter
from typing import Optional

from pipeline.store.class_stats import ClassCounts, class_table, count_classes, format_class_table
from pipeline.store.layout import OutputLayout, read_failures, read_markers, read_output_config, read_runs, verify_markers
from pipeline.config.errors import first_line
from pipeline.io.redact import redact_url
from pipeline.io.storage import Location


class InputPatternError(ValueError):
    """``--input`` names no shards (or cannot be listed): the input's fault, not the output's."""


def summarize_output(output: Location, input_patterns: Optional[list[str]] = None, per_class: bool = False,
                     counts: Optional[list[ClassCounts]] = None) -> dict:
    """Counts from the output's markers; given the input too (read with the output's storage
    options), also how many of its shards are still to label (not done under the output's
    configuration). ``per_class``: also a row per class of the vocabulary (``class_table``), its
    summed counts appended to ``counts`` when given (for plots)."""
    layout = OutputLayout(output)
    if not layout.config_file.exists():
        raise FileNotFoundError(f"{output} is not a gemlabel output (no _config.json)")
    config = read_output_config(layout) or {"fingerprint": "unreadable"}  # warned
    all_markers = read_markers(layout)
    markers, broken = verify_markers(layout, all_markers, read_footers=False)
    failures = {k: v for k, v in read_failures(layout).items() if k not in markers}
    missing = {all_markers[k]["shard"]: why for k, why in broken.items() if k not in failures}
    histogram: Counter = Counter()
    for marker in markers.values():
        histogram.update(marker.get("error_histogram", {}))
    busy = sum(m["timings"]["total_s"] for m in markers.values())
    images = sum(m["samples"] for m in markers.values())
    runs = sorted(read_runs(layout), key=lambda r: r["started_at"])
    settings = config.get("settings", {})
    pending = None
    if input_patterns:
        from pipeline.io.shards import list_shards
        done = {k for k, m in markers.items() if m.get("fingerprint") == config["fingerprint"]}
        inputs = [output.at(pattern) for pattern in input_patterns]
        try:
            pending = sum(1 for shard in list_shards(inputs) if shard.shard_id not in done)
        except (ValueError, OSError) as err:  # a glob that matches nothing, an unreadable list
            raise InputPatternError(f"--input: {first_line(err)}") from None
    report = {
        "output": redact_url(output.url), "fingerprint": config["fingerprint"], "model": settings.get("model"),
        "pretrained": settings.get("pretrained"), "classes": len(settings.get("vocab", [])),
        "shards_done": len(markers), "shards_failed": len(failures), "shards_missing": len(missing),
        "shards_pending": pending,
        "shards_with_image_errors": sum(1 for m in markers.values() if m["errors"]),
        "images": images, "images_ok": sum(m["ok"] for m in markers.values()),
        "image_errors": sum(m["errors"] for m in markers.values()),
        "labels": sum(m["labels"] for m in markers.values()),
        "error_histogram": dict(histogram.most_common()),
        "worker_images_per_s": round(images / busy, 3) if busy else None,
        "failed_shards": {f["shard"]: f["error"] for f in failures.values()},
        "missing_shards": missing,
        "runs": [{k: r.get(k) for k in ("run_id", "started_at", "finished_at", "shards_done", "shards_skipped",
                                        "shards_failed", "images", "images_per_s")} for r in runs],
        "per_class": None,
    }
    if per_class:  # reading the files also finds one damaged since its marker: it is missing
        report["per_class"], unreadable = _per_class(layout, sorted(markers), settings, counts)
        report["missing_shards"].update({markers[k]["shard"]: why for k, why in unreadable.items()})
        report["shards_missing"] = len(report["missing_shards"])
        report["shards_done"] -= len(unreadable)
    return report


def _per_class(layout: OutputLayout, shard_ids: list[str], settings: dict,
               sink: Optional[list[ClassCounts]]) -> tuple[list[dict], dict[str, str]]:
    from pipeline.config import class_labels
    names = class_labels(settings.get("vocab", []))
    counts, unreadable = count_classes(layout, shard_ids, len(names))
    if sink is not None:
        sink.append(counts)
    return class_table(counts, names), unreadable


def format_report(report: dict) -> str:
    lines = [f"output      {report['output']}  (config {report['fingerprint']})",
             f"model       {report['model']} / {report['pretrained']}, {report['classes']} classes",
             f"shards      {report['shards_done']} done, {report['shards_failed']} failed, "
             f"{report['shards_missing']} missing, "
             f"{report['shards_with_image_errors']} with image errors"
             + (f", {report['shards_pending']} pending (of the given input)" if report["shards_pending"] is not None
                else ""),
             f"images      {report['images']} ({report['images_ok']} ok, {report['image_errors']} errors), "
             f"{report['labels']} labels",
             f"throughput  {report['worker_images_per_s']} images/s per worker"]
    if report["error_histogram"]:
        lines.append("errors      " + ", ".join(f"{k}: {v}" for k, v in report["error_histogram"].items()))
    lines += [f"FAILED      {url}: {error}" for url, error in report["failed_shards"].items()]
    lines += [f"MISSING     {url}: {why} (a rerun relabels it)" for url, why in report["missing_shards"].items()]
    if report.get("per_class"):
        lines.append(format_class_table(report["per_class"]))
    if report.get("plots"):
        lines.append("plots       " + ", ".join(report["plots"]))
    for run in report["runs"]:
        lines.append(f"run         {run['run_id']}: {run['shards_done']} labelled, {run['shards_skipped']} skipped, "
                     f"{run['shards_failed']} failed, {run['images']} images at {run['images_per_s']} images/s")
    return "\n".join(lines)
