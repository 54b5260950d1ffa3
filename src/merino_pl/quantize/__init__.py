"""GPTQ / RTN INT8-INT4 weight quantization of MeRino models (``merino-pl quantize``).

The stage's entry is ``api.quantize(QuantizeSettings) -> QuantizeReport``; ``cli.py`` turns the
flags (and a ``--config`` preset) into those settings. ``run.py`` is one run end to end (quantize,
check against the float model, write, reload); ``passes.quantize_model`` quantizes a model in
place (shared-weight aware) with the solver of ``gptq.py`` on the windows of ``calibration.py``;
``report.py`` is the report's schema. The format itself (``QuantSpec``, the GPTQ v1 directory,
``QuantLinear``) is core: ``merino_pl.core.quant``, read by the stages that load such a directory.

This ``__init__`` imports nothing: ``merino-pl quantize --help`` and the pipeline's argument
check need no torch.
"""

from merino_pl.core.quant.spec import SUPPORTED_BITS

__all__ = ["SUPPORTED_BITS"]
