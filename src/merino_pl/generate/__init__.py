"""Generate stage (``merino-pl generate``): decode text from an exported, quantized or trained model
with its KV cache, on PyTorch or on onnxruntime (the ONNX graph ``merino_pl.export.onnx`` writes).

``api.generate(GenerateSettings(...))`` is the entry; ``cli`` turns flags into those settings.
This ``__init__`` imports nothing: ``merino-pl generate --help`` and bad-input errors need no torch.
"""
