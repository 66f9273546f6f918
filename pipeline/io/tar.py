"""Reading one webdataset tar shard as samples, in order, without an index of past members.

The tar is read through fsspec (webdataset has no s3:// opener) and split into samples by
webdataset's rule; a shard that cannot be read (missing, truncated) raises ``ShardReadError``
from the iterator. Decoding the images is the worker's (``pipeline.worker.decode``).

How tar members become rows (every image member gets exactly one row):

- Members are grouped as webdataset groups them: a sample's key is the member's path up to the
  first dot of its file name (``a/img.v1.jpg`` -> key ``a/img``, entry ``v1.jpg``), and adjacent
  members with the same key form one sample (``x.jpg`` + ``x.txt``).
- A sample holding several images (``x.jpg`` + ``x.png``, ``img.v1.jpg`` + ``img.v2.jpg``) gives
  one row per image, in tar order; a member name repeated inside a sample starts a new sample.
- ``sample_id`` is ``<shard id>/<key>`` for the first row of a key in the shard and
  ``<shard id>/<key>#2``, ``#3``, ... for later ones (repeated keys, adjacent or not, and the
  extra images of one key), skipping any ``#n`` that a member's own key already took (members
  ``k.jpg, k#2.jpg, k.jpg`` -> ``k``, ``k#2``, ``k#3``), so ids are unique within the output
  whatever the member names.
- A ``seg.png`` entry (``key.seg.png``) is the image's ground-truth mask, not an image: it rides
  with the sample (``gemlabel eval`` reads it) and gets no row of its own.
- A sample with no image is an error row. A tar without its end-of-archive blocks (cut, even
  exactly at a member boundary) is a truncated shard.
"""
from __future__ import annotations

import posixpath
import re
import tarfile
from typing import Iterator, Optional


from pipeline.io.guarded import guarded_open
from pipeline.io.redact import redact_text, redact_url
from pipeline.io.storage import Location, is_local


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


# Entries that annotate the sample's image rather than being images to label: the ground-truth
# mask of evaluation shards (``key.jpg`` + ``key.seg.png``).
MASK_ENTRY = "seg.png"


class ShardReadError(RuntimeError):
    """The shard itself could not be read: the whole shard is retried."""


_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")


def error_text(err: BaseException) -> str:
    """``Type: message`` without run-specific object addresses (``<_io.BytesIO object at
    0x7f..>``), so two runs over the same data write equal rows; without credentials in URLs."""
    return redact_text(_ADDRESS.sub("", f"{type(err).__name__}: {err}"))


def http_status(err: BaseException) -> Optional[str]:
    """The HTTP status (``500 Internal Server Error``) an error or what caused it carries, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        status = getattr(err, "status", None)
        if isinstance(status, int) and status >= 400:
            return f"{status} {getattr(err, 'message', '') or ''}".strip()
        err = err.__cause__ or err.__context__
    return None


class _EndAwareTarInfo(tarfile.TarInfo):
    """Notes on its archive when the end-of-archive (all-zero) block is read: tarfile stops as
    quietly at a cut between two members as at a real end."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            archive.gemlabel_complete = True
            raise


def iter_tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file of a tar stream, in order; raises tarfile.ReadError
    when the archive is cut (mid-member or at a member boundary)."""
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo) as archive:
        for member in archive:
            if member.isreg():
                yield member.name, archive.extractfile(member).read()
            archive.members = []  # streaming: keep no index of past members
        if not getattr(archive, "gemlabel_complete", False):
            raise tarfile.ReadError(f"truncated: no end-of-archive block after {archive.offset} bytes")


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: key = path up to the first dot of the file name, entry = the rest."""
    folder, base = posixpath.split(name)
    stem, dot, rest = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, rest if dot else ""


def _is_image(entry: str) -> bool:
    return entry.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and entry.lower() != MASK_ENTRY


def group_samples(members: Iterator[tuple[str, bytes]]) -> Iterator[dict]:
    """Members -> raw samples ({'__key__', '__uid__', entry: bytes}), one per image (see the
    module docstring for the rule)."""
    seen: dict[str, int] = {}  # key -> the last n its uids used
    used: set[str] = set()     # every uid given so far: a key may itself look like ``k#2``

    def unique(key: str) -> str:
        n = seen.get(key, 0)
        uid = key if n == 0 else f"{key}#{n + 1}"
        while uid in used:
            n += 1
            uid = f"{key}#{n + 1}"
        seen[key] = n + 1
        used.add(uid)
        return uid

    def emit(sample: dict) -> Iterator[dict]:
        images = [entry for entry in sample if not entry.startswith("__") and _is_image(entry)]
        others = {k: v for k, v in sample.items() if k not in images}
        for entry in images or [None]:
            yield {**others, **({entry: sample[entry]} if entry else {}), "__uid__": unique(sample["__key__"])}

    current: Optional[dict] = None
    for name, data in members:
        key, entry = split_member_name(name)
        if current is None or key != current["__key__"] or entry in current:
            if current is not None:
                yield from emit(current)
            current = {"__key__": key}
        current[entry] = data
    if current is not None:
        yield from emit(current)


def iter_tar_samples(source: Location, stall_s: Optional[float] = None) -> Iterator[dict]:
    """Raw samples ({'__key__': ..., '__uid__': ..., 'jpg': bytes, ...}) of one tar, in order.
    ``stall_s``: the shard fails as stalled when opening it or a read gives nothing for this
    long (``pipeline.io.guarded``); a local shard that is not a regular file (a FIFO) fails at once."""
    try:
        fs, path = source.fs_path
        with guarded_open(lambda: source.open("rb"), source.url, stall_s, path if is_local(fs) else None) as stream:
            for sample in group_samples(iter_tar_members(stream)):
                yield {**sample, "__url__": source.url}
    except Exception as err:  # missing file, tarfile.ReadError on truncation, storage errors
        status = http_status(err)  # fsspec's HTTP back end calls any failed request "not found"
        text = f"HTTPError: the server answered {status} for {redact_url(source.url)}" if status else error_text(err)
        raise ShardReadError(text) from (None if redact_text(str(err)) != str(err) else err)


def image_entry(sample: dict) -> Optional[str]:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext
    for suffix in sample:
        if not suffix.startswith("__") and _is_image(suffix):
            return suffix
    return None

