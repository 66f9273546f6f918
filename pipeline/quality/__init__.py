"""Label quality against ground truth: the metric arithmetic (``metrics``, after mmseg's), reading
ground truth in three layouts (``groundtruth``), mapping its classes to the vocabulary
(``classmap``), scoring an output (``evaluate``), sweeping thresholds (``calibrate``), and the
report with its plots (``report``, ``plots``).

Imports ``io``, ``config``, ``masks`` and ``store`` (outputs are read through it alone), the
``driver`` (``evaluate`` may label ground-truth shards first) and the ``worker`` (``calibrate``
loads the model and decodes as a worker does).
"""
