"""``merino-pl pipeline``: search → fit → export → quantize → eval → latency as cached
subprocess stages (``cli``), and the summary's plots (``plots``)."""
