"""Latency stage: reports on the target device, device latency tables, deployment export.

``cli`` (``merino-pl latency``), ``report`` (what a report measures), ``harness`` (the timing
protocol), ``device`` (what the device is), ``peers`` (the paper's baselines from their
published configs), ``fast`` (the fast inference path), ``profile`` (device latency tables for
the search), ``onnx_export`` (ONNX with KV cache), ``plot`` (Figure 1).

This ``__init__`` imports nothing, so ``merino-pl latency --help`` starts without torch.
"""

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
