"""The exported decoder graph on onnxruntime: one session, the graph's names, the feeds, the cache.

``export.onnx`` writes one graph for prefill and decode with optimum's names (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key / .value`` in; ``logits``,
``present.{i}.key / .value`` out). ``DecoderSession`` reads those names from the graph itself (so
it runs any graph of that shape, not only one whose model is at hand) and turns "these token ids
after ``start`` cached tokens" into a feed. Both onnxruntime decoders are built on it: the
latency stage's timed runner and ``merino-pl generate --runtime onnxruntime``.

numpy and onnxruntime only: no torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merino_pl.core.errors import MerinoError

WEIGHTS_KEY = "merino.weights_sha256"  # graph metadata: the SHA-256 of the weights file it was exported from
GRAPH_NAME = "model.onnx"  # the graph `merino-pl export --onnx` writes into a model directory
FIXED_INPUTS = ("input_ids", "attention_mask", "position_ids")
PAST, PRESENT = "past_key_values.", "present."


def open_session(path: str | Path, threads: int | None = None, device: str = "cpu", quiet: bool = False) -> Any:
    """An onnxruntime session over ``path`` with ``threads`` intra-op threads (None: onnxruntime's
    default), on CUDA first when ``device`` is one; ``quiet``: errors only (no "unused
    initializer" warnings)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if quiet:
        options.log_severity_level = 3
    providers = ["CUDAExecutionProvider"] if device.startswith("cuda") else []
    return ort.InferenceSession(str(path), options, providers=[*providers, "CPUExecutionProvider"])


class DecoderSession:
    """A decoder graph with a KV cache: ``run(ids, start, past) -> (logits, present)``.

    ``past`` and ``present`` are lists in the graph's cache order (key, value of each layer
    application); ``empty_past(batch)`` is the cache of a prefill. A graph without these names is
    a one-line ``MerinoError`` naming what it has, as is a file onnxruntime cannot load.
    """

    def __init__(self, path: str | Path, threads: int | None = None, device: str = "cpu", quiet: bool = False) -> None:
        self.path = Path(path)
        try:
            self.session = open_session(path, threads, device, quiet)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail / InvalidGraph / OSError
            raise MerinoError(f"{path}: onnxruntime cannot load it ({str(e).strip().splitlines()[0]})") from None
        self._read_signature()

    def _read_signature(self) -> None:
        import numpy as np

        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.past_names = [n for n in inputs if n.startswith(PAST)]
        self.present_names = [n.replace(PAST, PRESENT, 1) for n in self.past_names]
        shapes = [inputs[n].shape for n in self.past_names]
        if (
            {"input_ids", "attention_mask"} - set(inputs)
            or "logits" not in outputs
            or not self.past_names
            or set(self.present_names) - set(outputs)
            or not all(len(s) == 4 and isinstance(s[1], int) and isinstance(s[3], int) for s in shapes)
        ):
            raise MerinoError(
                f"{self.path}: not a decoder graph with a KV cache (expected input_ids, attention_mask, "
                "past_key_values.{i}.key/value -> logits, present.{i}.key/value; has "
                f"{', '.join(list(inputs)[:5])} -> {', '.join(list(outputs)[:3])})"
            )
        self.with_positions = "position_ids" in inputs
        self.dtype = np.float16 if inputs[self.past_names[0]].type == "tensor(float16)" else np.float32
        self.cache_shapes = [(s[1], s[3]) for s in shapes]  # (heads, head_dim) of each cache input
        vocab = outputs["logits"].shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else None
        self.weights_sha256 = self.session.get_modelmeta().custom_metadata_map.get(WEIGHTS_KEY)

    def check_weights(self, model: str | Path) -> None:
        """A graph that records the SHA-256 of the weights file it was exported from belongs to the
        model directory ``model`` holding that file and no other (same shapes are not enough)."""
        from merino_pl.core.checkpoint import WEIGHTS_NAME  # torch: only once a graph is run
        from merino_pl.core.io import sha256_file

        weights = Path(model) / WEIGHTS_NAME
        if not self.weights_sha256 or not weights.is_file() or sha256_file(weights) == self.weights_sha256:
            return
        raise MerinoError(
            f"{self.path}: a graph of other weights than {model} (exported from weights with SHA-256 "
            f"{self.weights_sha256[:12]}..., {weights} has {sha256_file(weights)[:12]}...): pass that "
            f"model's own graph, or export one with `merino-pl export {model} --onnx`"
        )

    @property
    def layers(self) -> int:
        """Cached layer applications (one key and one value each)."""
        return len(self.past_names) // 2

    def empty_past(self, batch: int = 1) -> list[Any]:
        """The cache before any token: ``past = 0`` tensors."""
        import numpy as np

        return [np.zeros((batch, h, 0, d), self.dtype) for h, d in self.cache_shapes]

    def run(self, ids: Any, start: int, past: list[Any]) -> tuple[Any, list[Any]]:
        """Logits (batch, T, vocab) of ``ids`` (int64, (batch, T)) at positions ``start ..``, on
        the ``start``-token cache ``past``; and the cache with them (``start + T`` tokens)."""
        import numpy as np

        batch, T = ids.shape
        feed = {"input_ids": ids, "attention_mask": np.ones((batch, start + T), dtype=np.int64)}
        if self.with_positions:
            feed["position_ids"] = np.arange(start, start + T, dtype=np.int64)[None].repeat(batch, 0)
        feed.update(zip(self.past_names, past))
        logits, *present = self.session.run(["logits", *self.present_names], feed)
        return logits, present
