"""``merino-pl pipeline``: search → fit → export → quantize → eval → latency as cached
subprocess stages and the run's summary. By job: ``config`` (the YAML), ``layout`` (every path
of a run), ``stages`` (command lines and skip keys), ``state`` (what ran, and the files the
pipeline owns), ``api`` (checking, locking, running: ``run_pipeline``), ``summary`` with
``reports`` and ``plots`` (``OUT/summary.md`` and its pictures); ``cli`` turns the flags into
``api``'s calls."""
