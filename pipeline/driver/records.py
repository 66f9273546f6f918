"""A run's summary (what ``gemlabel label`` prints and ``gemlabel report`` lists) and its record in
``OUT/_runs/``, written even while the output's storage is briefly unreachable."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


from pipeline.store.layout import write_json
from pipeline.io.redact import redact_url
from pipeline.io.storage import Location
from pipeline.config.errors import first_line


RECORD_WAIT_S = 120.0  # how long the end of a run waits for unreachable storage to write its record


@dataclass
class RunSummary:
    run_id: str
    output: str
    started_at: str
    finished_at: str = ""
    shards_total: int = 0
    shards_skipped: int = 0
    shards_moved: int = 0  # of the skipped: done shards whose input moved (``pipeline.driver.moved``)
    shards_done: int = 0
    shards_failed: int = 0
    images: int = 0
    image_errors: int = 0
    labels: int = 0
    seconds: float = 0.0
    actor_restarts: int = 0
    shard_retries: int = 0
    text_encodes: int = 0  # times the workers ran the text tower (0 when OUT/_cache had the embeddings)
    failed: dict[str, str] = field(default_factory=dict)  # shard url -> last error
    status: str = "running"  # ok | failed (some shards) | error (did not start or crashed) | interrupted
    error: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_record(self) -> dict:
        return {**self.__dict__, "output": redact_url(self.output), "images_per_s": round(self.images_per_s, 3)}

    def text(self) -> str:
        lines = [f"gemlabel run {self.run_id} -> {redact_url(self.output)}",
                 f"  shards: {self.shards_total} total, {self.shards_done} labelled, "
                 f"{self.shards_skipped} already done"
                 + (f" ({self.shards_moved} moved)" if self.shards_moved else "") + f", {self.shards_failed} failed",
                 f"  images: {self.images} ({self.image_errors} errors), labels: {self.labels}, "
                 f"{self.images_per_s:.2f} images/s over {self.seconds:.1f}s",
                 f"  actor restarts: {self.actor_restarts}, shard retries: {self.shard_retries}"]
        lines += [f"  FAILED {url}: {error}" for url, error in self.failed.items()]
        return "\n".join(lines)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during the run; the message says what was finished and how to resume."""

    def __init__(self, summary: "RunSummary"):
        left = summary.shards_total - summary.shards_skipped - summary.shards_done - summary.shards_failed
        super().__init__(f"interrupted: {summary.shards_done} shard(s) labelled in this run, {summary.shards_skipped} "
                         f"were already done, {left} left; rerun the same command to label the rest "
                         "(finished shards are kept)")
        self.summary = summary


class RunRecordError(RuntimeError):
    """The output's storage stayed unreachable: the run record could not be written."""


def record_run(file: Location, summary: RunSummary, out, wait_s: float = RECORD_WAIT_S) -> None:
    """Write the run record; while the output's storage is unreachable, wait for it (saying so)
    up to ``wait_s``, then give up with RunRecordError (the labels written so far stay done)."""
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            write_json(file, summary.as_record())
            return
        except Exception as err:  # fsspec back ends raise their own kinds
            if time.monotonic() > deadline:
                raise RunRecordError(
                    f"storage unreachable, run record not written ({first_line(err)}): {summary.shards_done} "
                    f"shard(s) labelled, {summary.shards_failed} failed, {summary.shards_skipped} already done; "
                    "rerun the same command once storage is back") from None
            if not said:
                print(f"gemlabel: cannot write the run record ({first_line(err)}); retrying for up to "
                      f"{wait_s:g}s", file=out, flush=True)
                said = True
            time.sleep(2.0)
