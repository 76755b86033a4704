"""PACS destinations and sources: DICOMweb (dicomweb-client) and DIMSE (pynetdicom).

Pushes results (SC + SEG) to a configured PACS and pulls a source X-ray from one
for edit mode; local files are only ever read. Import from the modules:

- ``config``: PacsError / TransientPacsError, the nodes (PacsNode, PacsConfig), reading
  and checking the configuration file (load_config, parse_config, list_nodes).
- ``retry``: with_retries, which retries transient failures with exponential backoff.
- ``instances``: what both transports share about instances: storage status text,
  choosing the X-ray to fetch from a series, writing it atomically.
- ``dicomweb``: STOW-RS push, QIDO-RS + WADO-RS fetch (TLS verification, HTTP errors).
- ``dimse``: C-STORE push, C-FIND + C-GET or C-MOVE fetch (associations, DIMSE statuses).
- ``transfer``: push_files, push_result, fetch_source, format_report, and the ``push``
  command (configure_parser, run).

Lower modules never import higher ones: config < retry < instances < dicomweb, dimse < transfer.
"""
