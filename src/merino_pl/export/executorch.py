"""ExecuTorch output: a ``.pte`` program for phones and embedded Linux, and a runner for it.

``export_pte`` lowers a MeRino model to one ExecuTorch program (XNNPACK delegate), fp32 or 8da4w
(8-bit dynamic activations, 4-bit weights in groups of 32, through torchao's
``Int8DynamicActivationIntxWeightConfig``, as ExecuTorch's own LLM export does; the LM head's
weights at 8 bit per output channel; the token and position tables 4-bit weight-only,
``IntxWeightOnlyConfig``). The program holds its KV cache:

    forward(tokens int64 (1, T), input_pos int64 (T,)) -> logits float (1, T, vocab)

``input_pos`` are the absolute positions of ``tokens``; their keys / values are written into
cache slots ``input_pos`` (one slot per position, ``max_len`` of them, one cache per layer
application), and each token attends to the slots at or before its own position. Prefill is one
call with positions ``0 .. T-1``, each decode step one call with ``T = 1`` and the next position:
the cache lives in the program's mutable buffers between calls. ``T`` is dynamic up to ``max_len``.
Two constant methods say the sizes to a runtime: ``get_max_seq_len`` and ``get_vocab_size``.

``PteRunner`` runs a ``.pte`` through ExecuTorch's Python runtime (``executorch.runtime``):
load, prefill, decode step, next-token logits, greedy generation.

ExecuTorch (and torchao) are not in ``.venv``: ``make executorch-env`` builds ``.venv/executorch``
with the same torch and merino-pl (docs/export.md says why).
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_path
from merino_pl.export.api import PTE_FILES, executorch_missing

GROUP = 32  # 8da4w's weight group (ExecuTorch's LLM default); a layer whose width it does not divide stays fp32
PTE_MAGIC = b"ET"  # bytes 4-5 of every ExecuTorch program (the flatbuffer's file identifier "ET12")


class _SlotCache:
    """The decoder's cache (``update(k, v, idx)``) over fixed buffers: this call's keys / values go
    into slots ``pos``, and the whole buffer is returned (the mask hides the slots not yet written)."""

    def __init__(self, buffers: list[torch.Tensor], pos: torch.Tensor) -> None:
        self.buffers, self.pos = buffers, pos

    def update(self, k: torch.Tensor, v: torch.Tensor, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.buffers[2 * idx], self.buffers[2 * idx + 1]
        k_cache.index_copy_(2, self.pos, k)  # (1, nh, max_len, hs), in place: a mutable buffer of the program
        v_cache.index_copy_(2, self.pos, v)
        return k_cache, v_cache


class PteDecoder(nn.Module):
    """``(tokens, input_pos) -> logits`` over a MerinoForCausalLM's decoder, KV cache in buffers.

    ``untie``: the LM head as an ``nn.Linear`` holding a copy of the token table, so that a
    quantizer treats it as the linear it is (the table itself is then quantized as an embedding).
    """

    def __init__(self, model: nn.Module, max_len: int, untie: bool = False) -> None:
        super().__init__()
        self.decoder, self.max_len = model.model, max_len
        arch, dtype = model.arch, next(model.parameters()).dtype
        shapes = [(b.embed_dim // arch.head_dim, arch.head_dim) for b in arch.blocks for _ in range(b.num_layers)]
        for i, (heads, dim) in enumerate(shapes):
            for kv in ("k", "v"):
                self.register_buffer(
                    f"{kv}_cache_{i}", torch.zeros(1, heads, max_len, dim, dtype=dtype), persistent=False
                )
        self.n_cache = len(shapes)
        self.lm_head: nn.Linear | None = None
        if untie:
            table = self.decoder.embed_tokens.weight
            self.lm_head = nn.Linear(table.shape[1], table.shape[0], bias=False, dtype=table.dtype)
            self.lm_head.weight = nn.Parameter(table.detach().clone())

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        buffers = [getattr(self, f"{kv}_cache_{i}") for i in range(self.n_cache) for kv in ("k", "v")]
        slots = torch.arange(self.max_len, device=tokens.device)
        mask = (slots[None, :] <= input_pos[:, None])[None, None]  # (1, 1, T, max_len): causal over written slots
        hidden = self.decoder(tokens, input_pos[None], mask, _SlotCache(buffers, input_pos))  # (1, T, d)
        return self.lm_head(hidden) if self.lm_head is not None else self.decoder.logits(hidden)


@dataclass(frozen=True)
class Scheme:
    """How ``quantize_8da4w`` quantizes: the weight group, and the bits of the untied LM head and of
    the embedding tables (0: left fp32). ``Scheme()`` is what ``export --executorch 8da4w`` writes.

    The head at 8 bit: on the demo's trained model (bench/executorch_agreement.py) a 4-bit head
    alone cost 8 points of agreement with fp32's next tokens (all at 4 bit: 90.0 %, head at 8 bit:
    94.5 %); MeRino-52M's program grows from 54.0 to 71.1 MB with it (0.148 -> 0.195 of fp32's)."""

    group: int = GROUP
    head_bits: int = 8  # the LM head's weights (8-bit dynamic activations, as every other linear)
    embedding_bits: int = 4  # the token and position tables, weight-only

    def name(self) -> str:
        return f"8da4w g{self.group}, head {self.head_bits or 32} bit, embeddings {self.embedding_bits or 32} bit"


def quantize_8da4w(module: nn.Module, scheme: Scheme | None = None) -> None:
    """torchao's 8da4w on every linear whose input width the group divides, weight-only on the
    embeddings (the configs ExecuTorch's LLM export uses for "8da4w" / "4w"), in place; the LM head
    (``lm_head``) and the tables at ``scheme``'s bits (8 bit: per output channel, the granularity
    XNNPACK's 8-bit kernels take; 4 bit: in groups)."""
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
        quantize_,
    )

    s = scheme or Scheme()

    def fits(kind: type, name: str | None = None, other: bool = False) -> Any:
        def ok(m: nn.Module, fqn: str) -> bool:
            named = name is None or (fqn == name) != other
            return isinstance(m, kind) and named and m.weight.shape[-1] % s.group == 0

        return ok

    def weights(bits: int) -> dict[str, Any]:
        return {
            "weight_dtype": getattr(torch, f"int{bits}"),
            "granularity": PerGroup(s.group) if bits == 4 else PerAxis(0),
        }

    if s.embedding_bits:
        quantize_(module, IntxWeightOnlyConfig(**weights(s.embedding_bits)), filter_fn=fits(nn.Embedding))
    if s.head_bits:
        w = weights(s.head_bits)
        head = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=w["weight_dtype"], weight_granularity=w["granularity"]
        )
        quantize_(module, head, filter_fn=fits(nn.Linear, "lm_head"))
    linear = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(s.group))
    quantize_(module, linear, filter_fn=fits(nn.Linear, "lm_head", other=True))


def export_pte(
    model: nn.Module, path: str | Path, kind: str = "fp32", max_len: int | None = None, scheme: Scheme | None = None
) -> Path:
    """Write ``model`` (a float MerinoForCausalLM) as an ExecuTorch program with its KV cache
    (module docstring), lowered to XNNPACK; ``kind``: ``fp32`` or ``8da4w`` (``scheme``: how;
    default ``Scheme()``); one file, atomic."""
    if kind not in PTE_FILES:
        raise MerinoError(f"ExecuTorch kind {kind!r}: expected one of {', '.join(PTE_FILES)}")
    if (why := executorch_missing()) is not None:
        raise MerinoError(why)
    with _native_log():
        _import_quietly()
    max_len = max_len or model.arch.max_position_embeddings
    if kind == "8da4w":
        model = copy.deepcopy(model)  # quantized in place: the caller's model stays float
    wrapper = PteDecoder(model.eval(), max_len, untie=kind == "8da4w").eval()
    if kind == "8da4w":
        quantize_8da4w(wrapper, scheme)
    with _quiet(), torch.no_grad():
        program = _lower(wrapper, max_len, model.arch.vocab_size)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(program.buffer)
    return path


def _lower(wrapper: nn.Module, max_len: int, vocab: int) -> Any:
    """torch.export (``T`` dynamic, 1..max_len) -> XNNPACK-delegated edge program -> ExecuTorch."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
    seq = torch.export.Dim("seq", min=1, max=max_len)
    exported = torch.export.export(wrapper, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)
    edge = to_edge_transform_and_lower(
        exported,
        partitioner=[XnnpackPartitioner()],
        # no edge-dialect dtype check, as ExecuTorch's own LLM export (its builder): it re-runs the
        # graph on fake tensors after each pass and each constant the partitioner duplicates
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods={"get_max_seq_len": max_len, "get_vocab_size": vocab},
    )
    # quant fusion: the 4-bit embedding's dequantize + gather become ExecuTorch's packed embedding kernel
    return edge.to_executorch(
        ExecutorchBackendConfig(extract_delegate_segments=True, do_quant_fusion_and_const_prop=True)
    )


class _quiet:
    """The exporters' warnings (mutable-buffer notes, pytree deprecations) are not the user's business."""

    def __enter__(self) -> None:
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("torch").setLevel(self._level)
        self._warnings.__exit__(*exc)


class PteRunner:
    """A ``.pte`` written by ``export_pte``, run through ExecuTorch's Python runtime.

    ``prefill(ids)`` starts a sequence at position 0, ``step(token)`` feeds the next token; both
    return the next-token logits (vocab,) (``generate``'s decoder protocol), also kept in
    ``self.next_logits``. ``logits(ids)``: every position's logits (T, vocab) of a new sequence
    (teacher forcing). One sequence at a time, batch 1 (the program holds one cache).
    """

    def __init__(self, path: str | Path) -> None:
        if (why := executorch_missing()) is not None:
            raise MerinoError(why)
        self.path = Path(path)
        check_pte(self.path)
        with _native_log() as log:
            _import_quietly()
            from executorch.runtime import Runtime

            try:
                program = Runtime.get().load_program(self.path)  # verifies the flatbuffer (InternalConsistency)
                self.max_len = int(program.load_method("get_max_seq_len").execute([])[0])
                self.vocab_size = int(program.load_method("get_vocab_size").execute([])[0])
                self.method = program.load_method("forward")
            except Exception as e:  # noqa: BLE001 - the runtime raises RuntimeError / ValueError with an error code
                detail = log.last() or _first_line(e)
                raise MerinoError(f"{self.path}: not a loadable ExecuTorch program ({detail})") from None
        self.pos, self.next_logits = 0, torch.empty(0)

    def check(self, arch: Any, model: str) -> None:
        """The program is of ``model`` (architecture ``arch``): the same vocabulary, a cache within its context."""
        if self.vocab_size != arch.vocab_size or self.max_len > arch.max_position_embeddings:
            raise MerinoError(
                f"{self.path}: a program of another model (vocabulary {self.vocab_size}, cache {self.max_len}; "
                f"{model} has {arch.vocab_size} and context {arch.max_position_embeddings})"
            )

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[-1]
        if self.pos + T > self.max_len:
            raise MerinoError(f"{self.path}: {self.pos + T} tokens exceed the program's KV cache of {self.max_len}")
        out = self.method.execute([ids.reshape(1, T).long(), torch.arange(self.pos, self.pos + T)])[0]  # (1, T, V)
        self.pos += T
        self.next_logits = out[0, -1]
        return out[0]

    def logits(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Logits (T, vocab) of every position of a new sequence ``ids`` (positions 0 .. T-1)."""
        self.pos = 0
        return self._run(torch.as_tensor(ids))

    def prefill(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """The next-token logits (vocab,) after a new sequence ``ids``."""
        return self.logits(ids)[-1]

    def step(self, token: int) -> torch.Tensor:
        """The next-token logits (vocab,) after feeding one more token at the next position."""
        return self._run(torch.tensor([token]))[0]

    def generate(self, ids: list[int] | torch.Tensor, max_new_tokens: int, eos: int | None = None) -> list[int]:
        """Greedy continuation of ``ids`` (stops after ``eos`` or at the cache's end)."""
        new = [int(self.prefill(ids).argmax())]
        while len(new) < max_new_tokens and new[-1] != eos and self.pos < self.max_len:
            new.append(int(self.step(new[-1]).argmax()))
        return new


def set_threads(threads: int) -> None:
    """XNNPACK's thread pool in this process (ExecuTorch's default: one thread per core)."""
    if (why := executorch_missing()) is not None:
        raise MerinoError(why)
    with _native_log():
        from executorch.extension.pybindings import portable_lib

        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)


def _import_quietly() -> None:
    """ExecuTorch's and torchao's imports, under ``_native_log``: torchao reports on stderr each CUDA
    library it cannot load (none exist on a CPU build) and torch a deprecation, at every import."""
    import executorch.exir  # noqa: F401 - imports torchao
    import executorch.kernels.quantized  # noqa: F401 - registers the 4-bit embedding kernel 8da4w programs call


class _native_log:
    """ExecuTorch's C++ runtime logs to the process's stderr (CPU probing at load, the reason a
    program is refused), below Python: file descriptor 2 goes to a temp file meanwhile, so that a
    failure is one line (the runtime's last log line in the message) and a good load prints nothing
    before the text."""

    def __enter__(self) -> _native_log:
        import sys
        import tempfile

        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc: Any) -> None:
        os.dup2(self.saved, 2)
        os.close(self.saved)

    def last(self) -> str | None:
        self.file.seek(0)
        lines = [line.strip() for line in self.file.read().decode(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("[") and "cpuinfo" not in line]  # "[file.cpp:N] ..."
        return errors[-1] if errors else None


def check_pte(path: Path) -> None:
    """One line for a missing file or one that is not an ExecuTorch program (read before the runtime
    sees it: a corrupt flatbuffer aborts the process instead of raising)."""
    if not path.is_file():
        raise MerinoError(f"{path}: no such .pte file")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:6] != PTE_MAGIC:
        raise MerinoError(f"{path}: not an ExecuTorch program (no 'ET' file identifier)")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
