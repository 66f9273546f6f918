"""Pure array helpers on label masks, shared by the worker, look and export: connected
components, polygons and prompt points (``components``), and each class's colour (``palette``).

Imports nothing of the pipeline (numpy and OpenCV only); every stage above ``io`` may import it.
"""
