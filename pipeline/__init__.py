"""gemlabel's data plane, one sub-package per stage. Data flows one way:

    input shards -> io -> worker (models, post-processing) -> store (Parquet + marker)
                    driver (plans the run, hands shards to worker actors, records the run)
    store -> quality (eval, calibrate) | look (show, gallery) | export (COCO, semantic, YOLO)

Who may import whom (``tests/test_layout.py`` checks it, and that no modules import in a circle):

    io      -> (nothing of the pipeline)
    masks   -> (nothing of the pipeline)
    config  -> io
    store   -> io, config, masks
    worker  -> io, config, masks, store
    driver  -> io, config, store, worker
    quality -> io, config, masks, store, driver, worker
    look    -> io, config, masks, store
    export  -> io, config, masks, store

Any stage may import ``gem`` (the models); ``gem`` imports nothing of the pipeline, and the
pipeline imports nothing of ``jobs`` (the command line).
"""
