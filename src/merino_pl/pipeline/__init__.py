"""``merino-pl pipeline``: search → fit → export → quantize → eval → latency as cached
subprocess stages and the run's summary (``api``; ``cli`` turns the flags into its calls), and
the summary's plots (``plots``)."""
