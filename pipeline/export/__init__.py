"""``gemlabel export``: labels -> COCO JSON (``coco``), semantic label maps (``semantic``) or YOLO
segmentation (``yolo``), one task per labels shard (``runner``: Ray tasks on a cluster when asked,
else local processes), into a folder that holds exactly one export (``folder``), with what the
formats share (``common``). Into tools without writing files: a Hugging Face Dataset (``hf``) and
a PyTorch stream of image + target from the input shards and the Parquet (``torch_data``).

Imports ``io``, ``config``, ``masks`` (geometry and colours) and ``store`` (outputs are read through
it alone); never the worker or driver.
"""
