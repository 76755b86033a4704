"""XReal engine: anatomy-then-pathology latent diffusion for synthetic chest X-rays.

Importing this package is cheap and needs no torch: heavy libraries are imported
inside the modules that use them (``pipeline``, ``convert``, ``server`` ...), so
``import xreal_engine.client`` works in Slicer's bare Python.
"""

__version__ = "0.1.0"
