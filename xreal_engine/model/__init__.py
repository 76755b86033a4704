"""The model: metadata (info), the one sampling policy (sampling), network configs and the one DDIM
schedule (architecture), the sampler (pipeline), loading, random test models and conversion.

``info`` and ``sampling`` need only the standard library (the Slicer module imports ``sampling``);
the other files need torch. Nothing here imports ``cli``, ``service`` or ``pacs``.
"""
