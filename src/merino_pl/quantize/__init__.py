"""GPTQ / RTN INT8-INT4 weight quantization of MeRino models (``merino-pl quantize``).

``runner.quantize_model`` quantizes a model in place (shared-weight aware), ``format`` writes /
reads the GPTQ v1 checkpoint directory, ``qlinear.QuantLinear`` is the module it loads into.
"""
