"""``merino-pl info``: a recipe's architecture table, parameters, FLOPs, KV cache and entropy."""
