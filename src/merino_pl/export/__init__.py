"""Export stage (``merino-pl export``): a checkpoint as a transformers-loadable directory
(``cli``) or an ONNX graph with KV cache, fp32 or with ``MatMulNBits`` for quantized
directories (``onnx``)."""
