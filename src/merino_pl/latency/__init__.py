"""Latency stage: reports on the target device, and the device latency tables the search reads.

``cli`` (``merino-pl latency``: flags -> settings), ``api`` (the entries ``latency`` and
``profile``; arguments checked once), ``options`` (what a report depends on), ``measure`` (the
rows: ``ReportBuilder``), ``timing`` (the timing protocol: ours and the paper's), ``runners``
(what is timed: a torch model, or the exported graph on onnxruntime through
``export.session``), ``ratios`` (speed-ups, fast-path gains, spread warnings), ``report``
(``LatencyReport``: the schema and its Markdown, torch-free), ``device`` (what the device is),
``peers`` (the paper's baselines from their published configs), ``fast`` (the fast inference
path), ``profile`` (device latency tables for the search), ``plot`` (Figure 1).

This ``__init__`` imports nothing, so ``merino-pl latency --help`` starts without torch.
"""

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
