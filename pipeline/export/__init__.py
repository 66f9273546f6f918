"""``gemlabel export``: labels -> COCO JSON (``coco``), semantic label maps (``semantic``) or YOLO
segmentation (``yolo``), one Ray task per labels shard (``runner``), with what the formats share
(``common``).

Imports ``io``, ``config``, ``masks`` (geometry and colours) and ``store`` (outputs are read through
it alone); never the worker or driver.
"""
