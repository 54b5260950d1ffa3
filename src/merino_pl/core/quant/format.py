"""Write and read GPTQ checkpoint directories.

    OUT/
      config.json            the model's HF config + ``quantization_config`` (as transformers' GPTQ integration reads)
      quantize_config.json   bits, group_size, desc_act, sym, ... (as auto-gptq / GPTQModel write it)
      model.safetensors      per quantized linear: qweight, qzeros, scales, g_idx (+ bias);
                             everything else (embeddings, norms, projections) in full precision,
                             or with ``--embedding int8`` the token table as int8 rows + fp16
                             scales (``model.embed_tokens.qweight`` / ``.scales``: ours alone)
      tokenizer.json, tokenizer_config.json, ...
      quantize_report.json / .md

One file per model, one set of tensors per block: a shared layer is stored once however many
times it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from merino_pl import __version__
from merino_pl.core.checkpoint import WEIGHTS_NAME, check_safetensors, save_model_files
from merino_pl.core.errors import MerinoError
from merino_pl.core.hf import MerinoForCausalLM, MerinoHFConfig
from merino_pl.core.quant.packing import pack
from merino_pl.core.quant.qembedding import QuantEmbedding, attach
from merino_pl.core.quant.qlinear import QuantLinear, stream_blocks
from merino_pl.core.quant.rtn import QuantizedWeight
from merino_pl.core.quant.spec import EMBEDDINGS, SUPPORTED_BITS, QuantSpec  # re-exported: the format's readers

QUANTIZE_CONFIG = "quantize_config.json"
BLOCKS = "model.blocks"  # the shared blocks: every quantized linear lies under them


def quantize_config(spec: QuantSpec) -> dict[str, Any]:
    """The ``quantize_config.json`` keys auto-gptq 0.7 / GPTQModel 7 write for a v1 checkpoint."""
    return {
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": spec.desc_act,
        "sym": spec.sym,
        "lm_head": False,
        "damp_percent": spec.damp_percent,
        "static_groups": False,
        "true_sequential": spec.true_sequential,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "model_file_base_name": "model",
        # the embedding variant lives in `meta` (free-form in GPTQModel's config), so an fp16
        # directory's quantize_config.json stays what the standard tools read
        "meta": {"quantizer": [f"merino-pl:{__version__}"], "method": spec.method, "embedding": spec.embedding},
    }


# The one float dtype table: precision name (latency's --precision) -> dtype. quantize's
# --float-dtype and config.json's "dtype" use torch's own name of the same dtypes (dtype_name).
FLOAT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype (``float16``), as ``config.json`` and ``--float-dtype`` write it."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """The dtype a precision name (``fp16``) or torch's name for it (``float16``) stands for."""
    by_name = {**FLOAT_DTYPES, **{dtype_name(d): d for d in FLOAT_DTYPES.values()}}
    return by_name[name]


def _unquantized(model: MerinoForCausalLM, quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in model.state_dict().items() if not (k.endswith(".weight") and k[: -len(".weight")] in quantized)
    }


def round_unquantized(model: MerinoForCausalLM, quantized: dict[str, QuantizedWeight], dtype: torch.dtype) -> None:
    """Round the tensors stored unquantized (embedding, norms, biases, projections) to ``dtype``
    in place, so the in-memory model is exactly what the written files hold."""
    with torch.no_grad():
        for v in _unquantized(model, quantized).values():
            if v.is_floating_point():
                v.copy_(v.to(dtype))


def packed_state_dict(
    model: MerinoForCausalLM, quantized: dict[str, QuantizedWeight], dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: packed GPTQ tensors for ``quantized``, the rest in ``dtype``
    (float16 by default, as GPTQ checkpoints are fp16 models: at MeRino's scale the unquantized
    embedding is most of the file)."""
    state = {
        k: (v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v).detach().contiguous()
        for k, v in _unquantized(model, quantized).items()
    }  # an int8 embedding's scales stay fp16
    for name, q in quantized.items():
        state.update({f"{name}.{t}": v.contiguous() for t, v in pack(q).items()})
    return state


def write_quantized(
    tmp: Path,
    model: MerinoForCausalLM,
    quantized: dict[str, QuantizedWeight],
    spec: QuantSpec,
    tokenizer: str | None,
    float_dtype: str = "float16",
) -> None:
    """Fill directory ``tmp`` with config, quantize config, weights and tokenizer."""
    qcfg = quantize_config(spec)
    config = MerinoHFConfig.from_dict(model.config.to_dict())
    # transformers' GPTQ integration (optimum) replaces the linears under these blocks
    config.quantization_config = {**{k: v for k, v in qcfg.items() if k != "meta"}, "block_name_to_quantize": BLOCKS}
    if spec.group_size > 0 and any(model.get_submodule(name).in_features % spec.group_size for name in quantized):
        # a layer narrower than a group (merino-tiny's 64 at group 128): GPTQModel's int4 CPU kernel
        # refuses it ("K divisible by qGroupSize"); its generic torch kernel takes any width
        config.quantization_config["backend"] = "torch"
    config.dtype = float_dtype  # what the unquantized tensors are stored in
    save_model_files(tmp, config, tokenizer)  # config.json, tokenizer, remote code
    (tmp / QUANTIZE_CONFIG).write_text(json.dumps(qcfg, indent=2) + "\n")
    save_file(
        packed_state_dict(model, quantized, torch_dtype(float_dtype)),
        str(tmp / WEIGHTS_NAME),
        metadata={"format": "pt"},
    )


def _check_shapes(path: Path, model: MerinoForCausalLM, state: dict[str, torch.Tensor], bits: int, group: int) -> None:
    """Every tensor of the file against the module built from the two configs, before loading: a
    quantized linear's that disagree mean ``quantize_config.json`` claims other bits / groups than
    the file holds (both named); another tensor's, that ``config.json`` describes another model."""
    expected = model.state_dict()
    for key, tensor in state.items():
        want = expected.get(key)
        if want is None or tuple(want.shape) == tuple(tensor.shape):
            continue
        name, _, kind = key.rpartition(".")
        module = model.get_submodule(name) if name else None
        if isinstance(module, QuantLinear) and f"{name}.qweight" in state and f"{name}.scales" in state:
            held_bits = 32 * state[f"{name}.qweight"].shape[0] // module.in_features
            groups = state[f"{name}.scales"].shape[0]
            raise MerinoError(
                f"{path / QUANTIZE_CONFIG}: bits: {bits}, group_size: {group} do not match {WEIGHTS_NAME}, whose "
                f"{name} holds {held_bits}-bit codes in {groups} group(s) of its {module.in_features} inputs "
                f"({kind} {tuple(tensor.shape)}, expected {tuple(want.shape)})"
            )
        raise MerinoError(
            f"{path}: {WEIGHTS_NAME} does not match config.json's architecture: {key} is {tuple(tensor.shape)}, "
            f"config.json makes it {tuple(want.shape)}"
        )


def load_quantized(path: str | Path) -> tuple[MerinoForCausalLM, dict[str, Any]]:
    """A ``MerinoForCausalLM`` whose quantized linears are ``QuantLinear`` modules, and its config."""
    path = Path(path)
    try:
        qcfg = json.loads((path / QUANTIZE_CONFIG).read_text())
        bits, group_size = int(qcfg["bits"]), int(qcfg["group_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MerinoError(f"{path / QUANTIZE_CONFIG}: not a GPTQ quantize config ({type(e).__name__}: {e})") from None
    if qcfg.get("checkpoint_format", "gptq") != "gptq":
        raise MerinoError(
            f"{path / QUANTIZE_CONFIG}: checkpoint_format: {qcfg.get('checkpoint_format')!r} (only 'gptq' loads here)"
        )
    if bits not in SUPPORTED_BITS or group_size == 0 or group_size < -1:
        raise MerinoError(
            f"{path / QUANTIZE_CONFIG}: bits: {bits}, group_size: {group_size} "
            f"(bits {' or '.join(map(str, SUPPORTED_BITS))}, group_size positive or -1 load here)"
        )
    embedding = (qcfg.get("meta") or {}).get("embedding", "fp16")
    if embedding not in EMBEDDINGS:
        raise MerinoError(f"{path / QUANTIZE_CONFIG}: meta.embedding {embedding!r} (valid: {', '.join(EMBEDDINGS)})")
    if not (path / WEIGHTS_NAME).exists():
        raise MerinoError(f"{path}: no {WEIGHTS_NAME}")
    check_safetensors(path / WEIGHTS_NAME)
    config = MerinoHFConfig.from_pretrained(path)
    # float tensors load as float32 whatever the writer used (GPTQModel writes bf16 / fp16 ones);
    # scales stay fp16 as the format defines them
    state = {
        k: v.float() if v.is_floating_point() and not k.endswith(".scales") else v
        for k, v in load_file(str(path / WEIGHTS_NAME)).items()
    }
    with torch.device("meta"):
        model = MerinoForCausalLM(config)
    for name in [k[: -len(".qweight")] for k in state if k.endswith(".qweight") and k != "model.embed_tokens.qweight"]:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise MerinoError(f"{path}: {name} holds a qweight but is not a linear layer of this architecture")
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent),
            child,
            QuantLinear(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None),
        )
    if embedding == "int8":
        attach(model.model, QuantEmbedding(config.vocab_size, model.arch.d_model))
    _check_shapes(path, model, state, bits, group_size)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())  # torch's message spans lines: one line, all of it
        raise MerinoError(f"{path}: {WEIGHTS_NAME} does not match config.json's architecture: {detail}") from None
    workspace = stream_blocks(model)  # one dequantization per block call; nothing float kept between calls
    if embedding == "int8":
        model.model.embed_tokens.workspace = workspace  # the head converts its row chunks there too
    return model.eval(), qcfg
