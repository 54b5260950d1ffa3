"""The quantized-model format: how to quantize (``spec``: ``QuantSpec``, torch-free, what
``quantize_config.json`` records), GPTQ v1 directories (``format``), bit packing (``packing``),
round-to-nearest grids (``rtn``), the packed modules a directory loads into (``qlinear``,
``qembedding``), torch's int4 kernel for them on CUDA (``tinygemm``) and their onnxruntime
nodes (``MatMulNBits``; a ``Gather`` + dequantize) (``onnx_nbits``). The quantize stage writes
this format; checkpoint loading, export and latency read it."""
