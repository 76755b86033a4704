"""Training tools: the data layout and ``prepare-data`` (``data.py``), the ``train`` command (``cli.py``), the
segmenter that scores generated images (``segmenter.py``) and the ``evaluate`` command (``evaluate.py``).

The training data layout every ``train`` sub-command reads::

    DATA/images/<id>.png     8- or 16-bit grey chest X-ray (any square size; resized to the config's image_size)
    DATA/labels/<id>.png     optional anatomy label map, values 0 background, 1 left lung (image right),
                             2 right lung (image left), 3 heart, 4 aorta
    DATA/findings.csv        columns id, split (train/val/test), finding ("" = unknown; used as the empty prompt)

``xreal-engine prepare-data --cxr ../shared/data/cxr --out DATA`` writes it from the project's shared data.
"""
