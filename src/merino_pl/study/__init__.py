"""The proxy study (``merino-pl study``): which zero-cost proxy ranks trained quality?

Samples architectures uniformly from a space's feasible set under a budget, trains each one
through ``merino-pl fit`` with identical data, tokens, schedule and seed, scores held-out loss,
and correlates every proxy (entropy, decoder parameters, FLOPs, layer applications, NTK
condition number, DSS) with it; ``calibrate`` fits the entropy settings the paper leaves open.
"""
