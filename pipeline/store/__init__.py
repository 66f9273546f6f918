"""The output store: what a labelled output is and how it is read back. The folder layout, JSON
records, fingerprint claims and stale-temp clean-up (``layout``), the stats marker that commits a
shard (``marker``), the Parquet schema (``schema``), COCO RLE (``rle``), reading an output's
samples and labels (``labelset``), and the runs summary of ``gemlabel report`` (``report``).

Imports ``io``, ``config`` and ``masks`` only. Quality, look and export read outputs through it
and nothing else; the worker writes through it.
"""
