"""The core every stage shares; it imports no stage (docs/architecture.md).

``config`` (architecture / recipe), ``costs`` (parameters, FLOPs, KV cache), ``io`` (atomic
writes, the one JSON / YAML readers), ``errors``, ``model`` (the decoder), ``hf`` (its transformers
adapter), ``tokenizer``, ``checkpoint`` (loading / saving checkpoints and model directories),
``remote_code`` (the files that load a directory without merino-pl), ``space`` and
``latency_table`` (the search-space and device-latency-table formats), ``quant`` (the GPTQ
checkpoint format and the packed modules it loads into).
"""
