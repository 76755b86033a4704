"""Synthetic-dataset factory: ``xreal-engine generate-batch`` (one manifest row = one generation job).

manifest.py  rows from a CSV / JSONL manifest, checked up front with their row numbers
designs.py   rows without a manifest: templates x findings x anatomy edits x seeds
quality.py   the per-image anatomy check (shipped segmenter, Dice per structure, --min-dice)
worker.py    one worker: the model loaded once, rows run through generate.py
backends.py  local (one process or a process pool), Ray Data, accelerate
exports.py   MONAI datalist, Hugging Face imagefolder, nnU-Net PNG pairs, dataset.json
command.py   the command: output directory state (lock, plan, failures.csv), progress, exit status

Importing this package needs no torch.
"""
