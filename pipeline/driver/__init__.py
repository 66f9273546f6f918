"""The driver: one labelling run from its config to its run record. Planning what to label
(``plan``: vocabulary, model checks, fingerprint, shards still to do; ``resolve``: local paths and
file contents), joining Ray (``cluster``), the pool of worker actors (``pool``), handing shards to
them and surviving their deaths (``dispatch``), the run's summary and record (``records``), and
the run itself (``run.run_labeling``).

Imports ``worker`` (the actor class it starts) and everything below it. Nothing in the worker or
store imports it; quality may call it to label ground truth.
"""
