"""Evaluation: lm-eval zero-shot tasks (backend ``merino`` or stock ``hf``), WikiText-2 / PTB
perplexity with a recorded protocol, and reports in the layout of the paper's Tables 2–3.

``merino-pl eval`` is :mod:`merino_pl.evaluation.cli`.
"""
