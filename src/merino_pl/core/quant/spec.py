"""How to quantize, as ``quantize_config.json`` records it: torch-free, so ``merino-pl quantize
--help`` and the pipeline's argument check read the defaults from here without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_BITS = (4, 8)  # the widths the grid, the packing and the file format handle
EMBEDDINGS = ("fp16", "int8")  # --embedding: stored like the other unquantized tensors, or int8 rows
# --float-dtype: torch's names of format.FLOAT_DTYPES' dtypes, here so that checking one imports no torch
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize (what ``quantize_config.json`` records)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    method: str = "gptq"  # "gptq" | "rtn"
    damp_percent: float = 0.01
    block_size: int = 128
    # off by default: one input pass per block instead of five (docs/quantize.md measures both)
    true_sequential: bool = False
    embedding: str = "fp16"  # "fp16": as the other unquantized tensors; "int8": row-wise int8 (qembedding.py)
