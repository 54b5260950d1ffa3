"""``merino-pl demo``: train the demo model (recipe merino-demo) on the embedded corpus and generate."""
