"""Cluster entrypoint: ``ray job submit --working-dir . -- python -m jobs.label --config jobs/configs/<name>.yaml``.

The same as ``gemlabel label``; inside a Ray job, RAY_ADDRESS points the driver at the cluster.
"""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
