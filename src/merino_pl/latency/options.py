"""What a latency report depends on besides the model and the device: ``Options``, checked once.

``Options.problems`` finds every invalid value before any model is built (``LatencySettings``
calls it, nothing else does); ``Options.protocol`` is what the report records of them. No torch
is imported unless a CUDA device is asked for (to check that one exists).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from merino_pl.latency import PRECISIONS
from merino_pl.latency.peers import PEER_CONFIGS

INT_BITS = {"int8": 8, "int4": 4}
PROTOCOLS = ("full", "paper")
RUNTIMES = ("torch", "onnxruntime", "executorch")
# the ExecuTorch rows: program kind per precision (fp32 as it is; int4 as ExecuTorch quantizes: 8da4w)
PTE_KINDS = {"fp32": "fp32", "int4": "8da4w"}
EMBEDDINGS = ("fp16", "int8")


@dataclass
class Timing:
    """How a model (or a kit's graph) is timed: a ``batch`` x ``seq`` prompt, ``runs`` timed after
    ``warmup`` untimed, ``decode_tokens`` one-token steps per decode run. A report's ``Options``
    and a device kit's ``kit.KitSettings`` are both made of it."""

    batch: int = 1
    seq: int = 128
    runs: int = 16
    warmup: int = 4
    decode_tokens: int = 8

    def timing_problems(self) -> list[str]:
        p = [
            f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
            for name in ("batch", "seq", "runs", "decode_tokens")
            if getattr(self, name) < 1
        ]
        return p + ([f"--warmup must be >= 0, got {self.warmup}"] if self.warmup < 0 else [])


@dataclass
class Options(Timing):
    """Everything a report depends on besides the model and the device (the timing: ``Timing``)."""

    device: str = "cpu"
    precisions: tuple[str, ...] = ("fp32",)
    seq_given: bool = True  # False: --seq not named, so a shorter trained context shortens the prompt
    peers: tuple[str, ...] = ()
    onnx: bool = False  # add the onnxruntime rows (--runtime onnxruntime)
    fast: bool = True
    seed: int = 0
    protocols: tuple[str, ...] = ("full",)
    runtimes: tuple[str, ...] = ("torch",)  # "onnxruntime" here and ``onnx`` both add the onnxruntime rows;
    # "executorch": the ExecuTorch rows (fp32 -> fp32 program, int4 -> 8da4w program: PTE_KINDS)
    generate_tokens: int = 128  # new tokens of the generation rows (0: none)
    generate_runs: int = 2
    embedding: str = "fp16"  # int rows made from a float model: its tied table fp16 or int8 (quantize --embedding)
    paper_runs: int = 16
    onnx_accuracy_level: int = 4  # MatMulNBits compute type of int rows (core.quant.onnx_nbits): 4 fast, 0 exact
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every invalid value, each naming what is wrong (checked before any heavy work)."""
        p = device_problems(self.device)
        bad = [x for x in self.precisions if x not in PRECISIONS]
        if bad or not self.precisions:
            p.append(f"--precision {','.join(bad) or '(empty)'} is not valid (choose from {','.join(PRECISIONS)})")
        p += self.timing_problems()
        for name in ("generate_runs", "paper_runs"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.generate_tokens < 0:
            p.append(f"--generate-tokens must be >= 0, got {self.generate_tokens}")
        bad = [x for x in self.protocols if x not in PROTOCOLS]
        if bad or not self.protocols:
            p.append(f"--protocol {','.join(bad) or '(empty)'} is not valid (choose from {','.join(PROTOCOLS)})")
        bad = [x for x in self.runtimes if x not in RUNTIMES]
        if bad or not self.runtimes:
            p.append(f"--runtime {','.join(bad) or '(empty)'} is not valid (choose from {','.join(RUNTIMES)})")
        if "executorch" in self.runtimes:
            p += executorch_problems(self.device, self.batch)
        if self.onnx_accuracy_level not in (0, 1, 2, 3, 4):
            p.append(f"--onnx-accuracy-level {self.onnx_accuracy_level} is not valid (0-4)")
        if self.embedding not in EMBEDDINGS:
            p.append(f"--embedding {self.embedding!r} is not valid (choose from {','.join(EMBEDDINGS)})")
        unknown = [x for x in self.peers if x not in PEER_CONFIGS]
        if unknown:
            p.append(f"unknown peer(s) {', '.join(unknown)} (valid: {', '.join(PEER_CONFIGS)})")
        return p

    def protocol(self) -> dict[str, Any]:
        """The protocol as the report records it (``LatencyReport.protocol``)."""
        from merino_pl.latency.timing import PAPER_PROTOCOL, PROTOCOL

        return {
            "protocols": list(self.protocols),
            "paper": PAPER_PROTOCOL if "paper" in self.protocols else None,
            "generation": f"greedy, {self.generate_tokens} new tokens after the {self.seq}-token prompt, tokens/s "
            f"(prompt included), mean of {self.generate_runs}"
            if self.generate_tokens
            else None,
            "batch": self.batch,
            "seq_len": self.seq,
            "runs": self.runs,
            "warmup": self.warmup,
            "decode_tokens": self.decode_tokens,
            "statistic": "mean (paper), median, p90 of the runs",
            "timing": PROTOCOL,
            "inputs": f"random token ids (seed {self.seed})",
            "decode": f"{self.decode_tokens} one-token steps on a {self.seq}-token KV cache, per token",
        }


def executorch_problems(device: str, batch: int) -> list[str]:
    """What keeps ``--runtime executorch`` from running here: the package (its own environment),
    a CUDA device (ExecuTorch's XNNPACK delegate runs on the CPU), a batch (the program holds one
    sequence's cache)."""
    import importlib.util

    p = []
    missing = [m for m in ("executorch", "torchao") if importlib.util.find_spec(m) is None]
    if missing:
        p.append(
            f"--runtime executorch: {' and '.join(missing)} not installed in this interpreter: `make executorch-env` "
            'builds .venv/executorch (then run .venv/executorch/bin/merino-pl), or pip install "merino-pl[executorch]"'
        )
    if device != "cpu":
        p.append(f"--runtime executorch runs on the CPU (XNNPACK), not --device {device}: time it with --device cpu")
    if batch != 1:
        p.append(f"--runtime executorch times batch 1 (the program holds one sequence's KV cache), not --batch {batch}")
    return p


def device_problems(device: str) -> list[str]:
    """``cpu``, or ``cuda[:N]`` where torch sees a CUDA device."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        return [f"--device {device!r} is not one of cpu, cuda"]
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return [f"--device {device}: no CUDA device is available here (torch {torch.__version__})"]
    return []
