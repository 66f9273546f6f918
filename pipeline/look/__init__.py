"""Looking at labels: picking samples and drawing overlays (``show``) and the single-file HTML
gallery (``gallery``).

Imports ``io``, ``config``, ``masks`` (it draws with them) and ``store`` (outputs are read through it
alone); never the worker or driver.
"""
