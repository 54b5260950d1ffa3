"""``merino-pl demo``: train the tiny model on the embedded corpus and generate."""
