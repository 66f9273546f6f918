"""A shard's stats marker: the one place its fields are built, for the worker and for tests that
write an output by hand (the two drifted apart once). No torch here: readers of outputs import it."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Mapping, Optional, Sequence


def shard_marker(shard_url: str, shard_id: str, fingerprint: str, rows: Sequence[Mapping], parquet_bytes: int,
                 error_histogram: Mapping[str, int], *, started: datetime, total_s: float,
                 timings: Optional[Mapping[str, float]] = None, input_identity: Optional[dict] = None, attempt: int = 0,
                 worker: Optional[dict] = None) -> dict:
    """The marker committed after a shard's Parquet file (``parquet_bytes`` long, holding ``rows``).

    error_histogram: error kind -> rows; timings: seconds per stage, ``total_s`` the whole shard's;
    input_identity: the shard file's identity when it was read (a replaced shard is relabelled).
    ``finished_at`` is now.
    """
    errors = sum(error_histogram.values())
    return {
        "shard": shard_url, "shard_id": shard_id, "fingerprint": fingerprint,
        "parquet": f"labels/{shard_id}.parquet", "parquet_bytes": parquet_bytes, "samples": len(rows),
        "input": input_identity,
        "ok": len(rows) - errors, "errors": errors,
        "labels": sum(len(row["labels"]) for row in rows), "error_histogram": dict(error_histogram),
        "timings": {k: round(v, 4) for k, v in {**(timings or {}), "total_s": total_s}.items()},
        "images_per_s": round(len(rows) / total_s, 3) if total_s > 0 else None,
        "attempt": attempt, "worker": worker,
        "started_at": started.isoformat(), "finished_at": datetime.now(timezone.utc).isoformat(),
    }
