"""One flat file name per sample, for every file made per image (export's images and label files,
show's overlays): unique whatever the tar member names are, and short enough for any filesystem.

Trainers (detectron2, Ultralytics) do not look into subfolders, so a sample id
``<shard_id>/<uid>`` becomes ``<shard_id>__<uid>`` when the uid is plain: no ``/``, no ``~``,
no ``__``, no leading ``_``, and the name fits in ``MAX_STEM_BYTES``. Any other uid (``a/b``,
a 250-character key) becomes a readable prefix plus ``~`` and 12 hex digits of the sample id's
SHA-256. Plain names never end in ``~`` + 12 hex digits (a plain uid has no ``~``), and the last
``__`` of a plain name is the one before the uid, so two samples never share a name (``a/b`` and
``a__b`` are both ``<shard_id>__a_b~`` followed by two different hashes).
"""
from __future__ import annotations

import hashlib
import re

MAX_STEM_BYTES = 200  # + an extension, well under the 255 bytes of ext4, XFS, APFS, NTFS names
_UNSAFE = re.compile(r"[^\w.\-]+")  # what the readable prefix of a hashed name keeps


def _plain(uid: str) -> bool:
    return "/" not in uid and "~" not in uid and "__" not in uid and not uid.startswith("_") and bool(uid) \
        and uid not in (".", "..") and uid.isprintable()


def sample_stem(sample_id: str) -> str:
    """The flat file name stem of a sample (add the extension)."""
    shard_id, _, uid = sample_id.partition("/")
    stem = f"{shard_id}__{uid}"
    if _plain(uid) and len(stem.encode()) <= MAX_STEM_BYTES:
        return stem
    readable = re.sub("_+", "_", _UNSAFE.sub("_", uid)).strip("_")
    prefix = f"{shard_id}__{readable}".encode()[:MAX_STEM_BYTES - 13].decode("utf-8", "ignore")
    return f"{prefix}~{hashlib.sha256(sample_id.encode()).hexdigest()[:12]}"
