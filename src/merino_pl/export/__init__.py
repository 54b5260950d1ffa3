"""Export stage (``merino-pl export``): a checkpoint as a transformers-loadable directory
(``cli``) or an ONNX graph with KV cache, fp32 or with ``MatMulNBits`` for quantized
directories (``onnx``), or ExecuTorch programs (``executorch``)."""

import logging

# Where torchao is installed (ExecuTorch's environment), transformers imports it, and at import
# torchao warns about each CUDA library a CPU build lacks and torch about each Enum it registers:
# lines on stderr before generate's text or a one-line error. Errors of both still show.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
