"""The generate stage's entry: ``generate(GenerateSettings(...)) -> GenerateResult``.

One decoding loop, three runtimes behind it (``executorch``: the program ``export --executorch`` wrote):

* ``torch``: the model as ``merino_pl.core.checkpoint.load_model`` reads it (a GPTQ directory keeps its packed
  weights), through the decoder call the ONNX exporter traces: a prefill with the head on the last position only,
  then one token at a time on a growing KV cache (transformers' ``DynamicCache``, as ``MerinoForCausalLM`` uses);
* ``onnxruntime``: the graph ``merino_pl.export.onnx`` writes (quantized layers as ``MatMulNBits``),
  run through ``merino_pl.export.session.DecoderSession`` (optimum's names read from the graph, the
  feeds, the cache: the latency stage's onnxruntime runner is built on it too). The graph
  is ``--onnx PATH``, else the model directory's own ``model.onnx`` (``merino-pl export --onnx``),
  else exported on the fly to ``--onnx-out`` (a new file) or to a temporary folder removed after.

Every runtime hands its last-position logits to the same chooser (argmax, or a seeded temperature / top-k draw
in PyTorch), so the same logits give the same tokens. A tokenizer with more ids than the model's vocabulary is
refused (``core.tokenizer.check_vocab``); the vocabulary is cut to the tokenizer's (a padded embedding's extra
rows are never chosen). Decoding stops at the tokenizer's end-of-text token (``core.tokenizer.find_eos``), after
``max_new_tokens``, or when the sequence fills the model's context. Timings cover the model calls and the choice
only, not the detokenization or printing: ``prefill_ms`` is the prompt's forward and the first new token, decode
tokens/s the remaining tokens over their steps.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import check_out
from merino_pl.export.session import GRAPH_NAME  # numpy / onnxruntime only on use: no torch

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from merino_pl.core.config import MerinoConfig

RUNTIMES = ("torch", "onnxruntime", "executorch")
STOPS = ("eos", "max_new_tokens", "context")
# the weights file of an exported and of a GPTQ directory (core.checkpoint / core.quant.format
# WEIGHTS_NAME), named here so that checking a path imports no torch
WEIGHTS_FILE = "model.safetensors"

Emit = Callable[[str], None]


def _ignore(_: str) -> None: ...


@dataclass(frozen=True)
class GenerateSettings:
    """One generation, as ``merino-pl generate``'s flags give it (``prompt`` is the text itself)."""

    model: str  # an exported / quantized directory, or a .ckpt from `merino-pl fit`
    prompt: str = ""  # empty: the model starts after an end-of-text token (a new document)
    max_new_tokens: int = 64
    runtime: str = "torch"  # torch | onnxruntime
    onnx: str | None = None  # an existing graph to decode with (onnxruntime)
    onnx_out: str | None = None  # keep the graph exported on the fly here (a new file; onnxruntime)
    pte: str | None = None  # executorch: the program to run (default: MODEL/model.pte, from `export --executorch`)
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None  # sample among the k most likely tokens (with temperature > 0)
    seed: int = 0  # of the sampling generator
    threads: int | None = None  # torch and onnxruntime intra-op threads (default: torch's)

    @property
    def sampling(self) -> str:
        if self.temperature == 0:
            return "greedy"
        return (
            f"temperature {self.temperature:g}"
            + (f", top-k {self.top_k}" if self.top_k else "")
            + f", seed {self.seed}"
        )

    def problems(self) -> list[str]:
        """Everything wrong with these settings, found without loading a model."""
        p = []
        if self.runtime not in RUNTIMES:
            p.append(f"--runtime {self.runtime!r}: unknown (valid: {', '.join(RUNTIMES)})")
        if self.max_new_tokens < 1:
            p.append(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            p.append(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            p.append(f"--top-k must be >= 1, got {self.top_k}")
        if self.threads is not None and self.threads < 1:
            p.append(f"--threads must be >= 1, got {self.threads}")
        return p + model_problems(Path(self.model)) + self._onnx_problems()

    def _onnx_problems(self) -> list[str]:
        p = []
        if self.onnx is not None:
            if self.runtime == "torch":
                p.append(f"--onnx {self.onnx}: a graph runs on --runtime onnxruntime, not torch")
            if not Path(self.onnx).is_file():
                p.append(f"--onnx {self.onnx}: no such file")
        if self.onnx_out is not None:
            out = Path(self.onnx_out)
            if self.onnx is not None or self.runtime != "onnxruntime":
                p.append(f"--onnx-out {out}: only for --runtime onnxruntime without --onnx (where a graph is exported)")
            elif out.exists() or out.is_symlink():
                p.append(f"--onnx-out {out}: exists (generate never overwrites a file; name a new one)")
            elif not out.parent.is_dir():
                p.append(f"--onnx-out {out}: no folder {out.parent}")
            else:  # a folder nothing can be created in: found now, not after the export
                p += check_out(out, flag="--onnx-out", file=True)
        if self.runtime == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
            p.append("--runtime onnxruntime: onnxruntime is not installed (pip install onnxruntime)")
        if self.pte is not None and self.runtime != "executorch":
            p.append(f"--pte {self.pte}: a program runs on --runtime executorch, not {self.runtime}")
        if self.runtime == "executorch" and importlib.util.find_spec("executorch") is None:
            p.append("--runtime executorch: executorch is not installed (make executorch-env: .venv/executorch)")
        return p


def model_problems(path: Path) -> list[str]:
    """A model directory with its weights, or a ``.ckpt`` file; the directory's tokenizer must load."""
    from merino_pl.core.tokenizer import load_tokenizer

    if not path.exists():
        return [f"MODEL {path}: no such file or directory"]
    if path.is_dir():
        if not (path / "config.json").is_file():
            return [f"MODEL {path}: not a model directory (no config.json)"]
        if not (path / WEIGHTS_FILE).is_file():
            return [f"MODEL {path}: no {WEIGHTS_FILE} (an exported or quantized directory keeps its weights there)"]
        if (path / "tokenizer.json").is_file():
            try:
                load_tokenizer(str(path))
            except MerinoError as e:
                return [f"MODEL {path}: {e}"]
        return []
    if path.suffix != ".ckpt":
        return [f"MODEL {path}: expected an exported or quantized model directory, or a .ckpt from `merino-pl fit`"]
    return []


@dataclass
class GenerateResult:
    """What one generation produced, and how fast."""

    prompt_tokens: int
    tokens: list[int]  # the new tokens; the end-of-text token last when it stopped there
    text: str  # their text (the end-of-text token left out)
    stop: str  # one of STOPS
    prefill_ms: float  # the prompt's forward and the choice of the first new token
    decode_s: float  # the steps of every new token after the first
    runtime: str
    sampling: str
    onnx: str | None = None  # the graph decoded with; None for torch and for a temporary export
    export_s: float | None = None  # seconds spent exporting the graph on the fly

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    def summary(self) -> str:
        """The one line ``merino-pl generate`` prints after the text."""
        rate = self.decode_tokens_per_s
        decode = f"decode {rate:.1f} tokens/s" if rate is not None else "decode - (one new token)"
        return (
            f"prompt {self.prompt_tokens} tokens, {len(self.tokens)} new tokens (stop: {self.stop}), "
            f"prefill {self.prefill_ms:.1f} ms, {decode} [{self.runtime}, {self.sampling}]"
        )


def generate(settings: GenerateSettings, on_text: Emit | None = None, on_note: Emit | None = None) -> GenerateResult:
    """Decode ``settings.max_new_tokens`` tokens at most after ``settings.prompt``; ``on_text``
    receives the text as it is generated, ``on_note`` what is being done (export, which graph)."""
    if problems := settings.problems():
        raise MerinoError("; ".join(problems))
    note = on_note or _ignore
    with _num_threads(settings.threads), tempfile.TemporaryDirectory(prefix="merino-generate-") as tmp:
        arch, model = _architecture(Path(settings.model))
        tok, eos, vocab = _tokenizer(Path(settings.model), arch.vocab_size)
        ids = tok.encode(settings.prompt).ids or [eos]  # an empty prompt starts a new document
        if len(ids) >= arch.max_position_embeddings:
            raise MerinoError(
                f"the prompt is {len(ids)} tokens, {settings.model}'s context {arch.max_position_embeddings}: "
                "shorten it"
            )
        result = GenerateResult(len(ids), [], "", "", 0.0, 0.0, settings.runtime, settings.sampling)
        if settings.runtime == "torch":
            backend: Decoder = TorchDecoder(model if model is not None else _load(settings.model))
        elif settings.runtime == "executorch":  # the program `export --executorch` wrote (export/executorch.py)
            from merino_pl.export.executorch import PteRunner

            result.onnx = settings.pte or str(Path(settings.model) / "model.pte")
            backend = PteRunner(result.onnx)
            backend.check(arch, settings.model)
        else:
            backend = OrtDecoder(_graph(settings, model, Path(tmp), result, note), settings.threads)
            backend.check(arch, settings.model)
        graph = f" ({result.onnx or 'its graph exported to a temporary file'})" if settings.runtime != "torch" else ""
        note(
            f"generate: {settings.model} on {settings.runtime}{graph}, {settings.sampling}, "
            f"at most {settings.max_new_tokens} new tokens"
        )
        _decode(
            backend,
            ids,
            settings,
            eos,
            arch.max_position_embeddings,
            Chooser(settings, vocab),
            TextStream(tok, on_text or _ignore),
            result,
        )
    return result


# ---- the loop -----------------------------------------------------------------------------------
class Decoder(Protocol):
    """A model with a KV cache: the last position's logits (vocab,) of the prompt, then of each token fed."""

    def prefill(self, ids: list[int]) -> torch.Tensor: ...

    def step(self, token: int) -> torch.Tensor: ...


def _decode(
    backend: Decoder,
    ids: list[int],
    settings: GenerateSettings,
    eos: int,
    context: int,
    choose: Chooser,
    stream: TextStream,
    result: GenerateResult,
) -> None:
    """Fill ``result``: tokens, text, stop reason and timings."""
    t0 = time.perf_counter()
    token = choose(backend.prefill(ids))
    result.prefill_ms = (time.perf_counter() - t0) * 1e3
    new, decode_s = [token], 0.0
    while True:
        if token == eos:
            stop = "eos"
            break
        stream.add(token)
        if len(new) >= settings.max_new_tokens:
            stop = "max_new_tokens"
            break
        if len(ids) + len(new) >= context:  # the next token's position would be past the context
            stop = "context"
            break
        t0 = time.perf_counter()
        token = choose(backend.step(token))
        decode_s += time.perf_counter() - t0
        new.append(token)
    result.tokens, result.text, result.stop, result.decode_s = new, stream.close(), stop, decode_s


class Chooser:
    """The next token from last-position logits: argmax, or a draw at ``temperature`` among the
    ``top_k`` most likely (a seeded ``torch.Generator``: the same logits give the same tokens)."""

    def __init__(self, settings: GenerateSettings, vocab: int) -> None:
        import torch

        self.temperature, self.top_k, self.vocab = settings.temperature, settings.top_k, vocab
        self.generator = torch.Generator().manual_seed(settings.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        import torch

        logits = logits[: self.vocab].float()
        if self.temperature == 0:
            return int(logits.argmax())
        index = None
        if self.top_k:  # the k most likely, in token order: a near-tie that swaps two of them changes no draw
            index = logits.topk(min(self.top_k, self.vocab)).indices.sort().values
            logits = logits[index]
        probs = torch.softmax(logits / self.temperature, dim=-1)
        pick = int(torch.multinomial(probs, 1, generator=self.generator))
        return int(index[pick]) if index is not None else pick


class TextStream:
    """The new tokens' text, emitted as soon as it is whole: a byte-level BPE token may end inside
    a UTF-8 character, which decodes as U+FFFD until the next token completes it."""

    def __init__(self, tok: Tokenizer, emit: Emit) -> None:
        self.tok, self.emit = tok, emit
        self.pending: list[int] = []  # tokens since the last whole-character boundary
        self.parts: list[str] = []

    def add(self, token: int) -> None:
        self.pending.append(token)
        text = self.tok.decode(self.pending)
        if not text.endswith("\ufffd"):
            self._flush(text)

    def close(self) -> str:
        if self.pending:
            self._flush(self.tok.decode(self.pending))
        return "".join(self.parts)

    def _flush(self, text: str) -> None:
        self.pending = []  # byte-level pieces concatenate: decoding resumes at this boundary
        if text:
            self.parts.append(text)
            self.emit(text)


# ---- the two runtimes ---------------------------------------------------------------------------
class TorchDecoder:
    """The loaded model's decoder on a growing KV cache: the call the ONNX exporter traces
    (``model.model(ids, positions, mask, cache)``, then the tied head on the last position)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.cache, self.length = model.eval(), None, 0

    def prefill(self, ids: list[int]) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache, self.length = DynamicCache(), 0
        return self._run(ids)

    def step(self, token: int) -> torch.Tensor:
        return self._run([token])

    def _run(self, ids: list[int]) -> torch.Tensor:
        import torch

        positions = torch.arange(self.length, self.length + len(ids))[None]  # (1, T)
        with torch.inference_mode():  # mask None: causal over the new tokens, all of the cache visible
            hidden = self.model.model(torch.tensor([ids]), positions, None, self.cache)  # (1, T, d)
            logits = self.model.model.logits(hidden[:, -1:])  # (1, 1, V): the head on the last position only
        self.length += len(ids)
        return logits[0, -1]


class OrtDecoder:
    """The exported graph on onnxruntime (``export.session.DecoderSession``: its names, feeds, cache)."""

    def __init__(self, path: Path, threads: int | None) -> None:
        import torch

        from merino_pl.export.session import DecoderSession

        # quiet: no onnxruntime warnings before the text; threads default to torch's, as the torch runtime's
        self.graph, self.path = DecoderSession(path, threads or torch.get_num_threads(), quiet=True), path
        self.past: list[Any] = []
        self.length = 0  # tokens in the cache

    def check(self, arch: MerinoConfig, model: str) -> None:
        """The graph is of ``model``: its weights file (when the graph records it), its cache, its vocabulary."""
        self.graph.check_weights(model)
        layers, vocab = self.graph.layers, self.graph.vocab
        if layers != arch.num_layer_applications or vocab not in (None, arch.vocab_size):
            raise MerinoError(
                f"{self.path}: a graph of another model ({layers} cached layers, vocabulary {vocab}; "
                f"{model} has {arch.num_layer_applications} and {arch.vocab_size})"
            )

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.length = 0
        return self._run(ids, self.graph.empty_past())

    def step(self, token: int) -> torch.Tensor:
        return self._run([token], self.past)

    def _run(self, ids: list[int], past: list[Any]) -> torch.Tensor:
        import numpy as np
        import torch

        logits, self.past = self.graph.run(np.array([ids], dtype=np.int64), self.length, past)
        self.length += len(ids)
        return torch.from_numpy(logits[0, -1].copy())


# ---- model, tokenizer, graph --------------------------------------------------------------------
def _tokenizer(model: Path, vocab_size: int) -> tuple[Tokenizer, int, int]:
    """The model directory's ``tokenizer.json`` (what its export shipped), or the one a ``.ckpt``
    was trained with, else the default one: (it, its end-of-text id, its size), one line when its ids
    reach past the model's ``vocab_size`` (``core.tokenizer.check_vocab``)."""
    from merino_pl.core.tokenizer import check_vocab, find_eos, load_tokenizer, model_tokenizer

    spec = model_tokenizer(model)  # never the default in place of a recorded one
    tok = load_tokenizer(spec)
    return tok, find_eos(tok, spec), check_vocab(tok, vocab_size, model, spec)


def _architecture(model: Path) -> tuple[MerinoConfig, torch.nn.Module | None]:
    """The architecture (context, vocabulary, cache layout): from a directory's config.json without
    its weights; a ``.ckpt`` is loaded (its recipe lives inside), and the model is returned too."""
    if not model.is_dir():
        net = _load(str(model))
        return net.arch, net
    from merino_pl.core.config import MerinoConfig
    from merino_pl.core.io import read_json

    config = read_json(model / "config.json", "model config")
    try:
        return MerinoConfig.from_dict(config["architecture"]), None
    except (ValueError, TypeError, KeyError) as e:
        raise MerinoError(f"{model}/config.json: not a MeRino config ({type(e).__name__}: {e})") from None


def _load(model: str) -> torch.nn.Module:
    from merino_pl.core.checkpoint import load_model

    return load_model(model).model


def _graph(
    settings: GenerateSettings, model: torch.nn.Module | None, tmp: Path, result: GenerateResult, note: Emit
) -> Path:
    """``--onnx``, else the directory's ``model.onnx``, else an export of the model (to ``--onnx-out``
    or into ``tmp``, which the caller removes); records which in ``result``."""
    if settings.onnx is not None:
        result.onnx = settings.onnx
        return Path(settings.onnx)
    beside = Path(settings.model) / GRAPH_NAME
    if beside.is_file():
        result.onnx = str(beside)
        return beside
    from merino_pl.export.onnx import export_onnx

    path = Path(settings.onnx_out) if settings.onnx_out else tmp / GRAPH_NAME
    note(f"exporting {settings.model} as ONNX to {path if settings.onnx_out else 'a temporary file'} ...")
    t0 = time.perf_counter()
    export_onnx(model if model is not None else _load(settings.model), path)
    result.export_s = time.perf_counter() - t0
    result.onnx = settings.onnx_out
    note(f"exported in {result.export_s:.1f} s")
    return path


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
