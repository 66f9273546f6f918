"""``python -m jobs.ray_ready ADDRESS``: wait until the Ray head at ADDRESS (its dashboard, e.g.
http://127.0.0.1:8265) takes jobs, so that the ``ray job submit`` after a ``ray start`` does not
fail with "No available agent to submit job".

The dashboard answers seconds before the head's job agent is up, and an agent whose port (52365
unless ``--dashboard-agent-listen-port`` says otherwise) another Ray head holds never comes up:
the one sure test is a job, so a no-op job (``true``) is submitted until one is taken, and waited
for. Exit 0 when the head takes jobs; 1 (one line saying why) when it did not within --timeout.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

AGENT_HINT = ("the head's job agent did not come up: if another Ray head runs on this machine it may hold "
              "the agent's port (52365); start this head with --dashboard-agent-listen-port=FREE_PORT")


def wait_until_ready(address: str, timeout_s: float = 120.0, poll_s: float = 2.0) -> Optional[str]:
    """None once the head has run a no-op job; else why not (the last error), after ``timeout_s``."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    deadline, why = time.monotonic() + timeout_s, "nothing answered"
    while time.monotonic() < deadline:
        try:
            client = JobSubmissionClient(address)
            job = client.submit_job(entrypoint="true", metadata={"gemlabel": "ray_ready check"})
            while time.monotonic() < deadline:
                status = client.get_job_status(job)
                if status == JobStatus.SUCCEEDED:
                    return None
                if status in (JobStatus.FAILED, JobStatus.STOPPED):
                    return f"the no-op check job {job} ended {status.value}"
                time.sleep(0.5)
            return f"the no-op check job {job} did not finish"
        except Exception as err:  # not up yet: connection refused, "No available agent", ...
            text = " ".join(str(err).split())
            why = AGENT_HINT if "No available agent" in text else (text[:300] or type(err).__name__)
            time.sleep(poll_s)
    return why


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.ray_ready", description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="the head's dashboard address, e.g. http://127.0.0.1:8265")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default: 120)")
    args = parser.parse_args(argv)
    why = wait_until_ready(args.address, args.timeout)
    if why is None:
        print(f"gemlabel: the Ray head at {args.address} takes jobs", file=sys.stderr)
        return 0
    print(f"gemlabel: error: the Ray head at {args.address} takes no jobs after {args.timeout:g}s: {why}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
