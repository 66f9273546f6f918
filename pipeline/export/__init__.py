"""``gemlabel export``: labels -> COCO JSON (``coco``), semantic label maps (``semantic``) or YOLO
segmentation (``yolo``), one task per labels shard (``runner``: Ray tasks on a cluster when asked,
else local processes), into a folder that holds exactly one export (``folder``), with what the
formats share (``common``).

Imports ``io``, ``config``, ``masks`` (geometry and colours) and ``store`` (outputs are read through
it alone); never the worker or driver.
"""
