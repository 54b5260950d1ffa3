"""GPTQ / RTN INT8-INT4 weight quantization of MeRino models (``merino-pl quantize``).

``runner.quantize_model`` quantizes a model in place (shared-weight aware), ``format`` writes /
reads the GPTQ v1 checkpoint directory, ``qlinear.QuantLinear`` is the module it loads into.

This ``__init__`` imports nothing: ``merino-pl quantize --help`` and the pipeline's argument
check need no torch.
"""

SUPPORTED_BITS = (4, 8)  # the widths the grid, the packing and the file format handle
