"""Everything the XReal Slicer module does that can run (and be tested) without Slicer.

No ``slicer``, ``qt``, ``vtk``, ``ctk`` or torch imports anywhere in this package:
the GUI in ``XRealSlicer.py`` passes numpy arrays and plain values in, and gets
plain values back. The engine's stdlib-only parts (``xreal_engine.client``,
``xreal_engine.errors``, the sampling policy ``xreal_engine.model.sampling``, the controls' names and scale
range ``xreal_engine.control_spec``, ``vocabulary.json``) are found next to the module by :mod:`XRealSlicerLib.enginepath`
(bundled by CMake, or the source checkout).
"""

from .enginepath import ensure_engine_importable

ensure_engine_importable()
