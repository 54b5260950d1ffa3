"""Evaluation: lm-eval zero-shot tasks (backend ``merino`` or stock ``hf``), WikiText-2 / PTB
perplexity with a recorded protocol, and reports in the layout of the paper's Tables 2–3.

The stage's entry function is :func:`merino_pl.eval.api.evaluate`;
``merino-pl eval`` (:mod:`merino_pl.eval.cli`) parses its flags and calls it.
"""
