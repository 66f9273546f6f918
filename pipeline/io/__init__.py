"""Where bytes live: URLs bound to their fsspec storage options (``storage``), the input shards a
run is given (``shards``), reading tar shards as webdataset samples (``tar``), an image's size from its
header (``image_header``), and packing image folders into shards (``pack``).

The lowest stage: it imports nothing of the pipeline, so every other stage may import it.
"""
