"""The worker: one Ray actor (``labeler.ShardLabeler``) that holds the models on its device and
labels whole shards. Decoding on threads (``decode``), the read/decode/model/post-process stages
that overlap two shards (``stages``), the copy of batches to the device (``device_feed``), the
shared text embeddings (``text_cache``) and the model settings a config asks for (``inference``).

Imports ``io``, ``config``, ``masks``, ``store`` and ``gem``; never the driver (it is run by it).
"""
