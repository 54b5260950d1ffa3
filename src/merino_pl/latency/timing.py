"""The timing protocol, shared by our models, the peers and the onnxruntime path (``runners``).

Protocol (paper: "batch size 1, sequence length 128, averaged over 16 measurements"):
``warmup`` untimed calls, then ``runs`` timed calls; each call is timed on its own with
``time.perf_counter`` (after ``torch.cuda.synchronize`` on CUDA, so queued kernels count). The
paper's number is the mean; the median and p90 say how noisy the device was.

* prefill: one forward over ``batch × seq`` tokens that also fills the KV cache;
* decode: ``decode_tokens`` single-token steps on top of a ``seq``-token KV cache, reported per
  token; the cache is cropped back to ``seq`` after every run so each run sees the same cache;
* generation: greedy decoding of N new tokens after the ``seq``-token prompt, as tokens/s.

``paper_latency_ms`` is the other protocol: the authors' own (``PAPER_PROTOCOL``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import random
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

K = TypeVar("K")

PROTOCOL = (
    "warm-up, then each run timed alone with time.perf_counter (CUDA synchronised); mean of runs (paper), median, p90"
)


@dataclass
class Stats:
    """Milliseconds over the timed runs."""

    mean: float
    median: float
    p90: float
    min: float
    max: float
    std: float
    runs: list[float] = field(default_factory=list)

    @classmethod
    def from_samples(cls, ms: list[float]) -> Stats:
        s = sorted(ms)
        # p90 by linear interpolation between order statistics (numpy's default method)
        pos = 0.9 * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        p90 = s[lo] + (s[hi] - s[lo]) * (pos - lo)
        std = statistics.stdev(s) if len(s) > 1 else 0.0
        return cls(statistics.fmean(s), statistics.median(s), p90, s[0], s[-1], std, [round(x, 4) for x in ms])

    def to_dict(self) -> dict[str, Any]:
        """The fields, plus the spread: ``cv`` (std / mean) and ``p90_over_median``."""
        d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        d["cv"] = round(self.std / self.mean, 4) if self.mean > 0 else 0.0
        d["p90_over_median"] = round(self.p90 / self.median, 4) if self.median > 0 else 1.0
        return d


def synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def time_calls(fn: Callable[[], Any], runs: int, warmup: int, sync: Callable[[], None]) -> list[float]:
    """``warmup`` untimed calls, then the wall time of each of ``runs`` calls in milliseconds."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_interleaved(
    fns: dict[K, Callable[[], Any]], rounds: int, warmup: int, sync: Callable[[], None], seed: int = 0
) -> dict[K, list[float]]:
    """Milliseconds of each of ``fns``, called once per round in a shuffled order after ``warmup``
    untimed calls each: a load change on a shared machine hits every variant alike, where
    ``time_calls`` one variant after the other would put it between them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[K, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            out[k] += time_calls(fns[k], 1, 0, sync)
    return out


# ---- peak memory ------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed heap pages back to the OS, so a previous model's activations that glibc kept
    resident do not hide this measurement's peak."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class PeakMemory:
    bytes: int | None = None
    method: str = ""


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[PeakMemory]:
    """Peak memory of the code inside the ``with``; ``method`` says exactly what was measured."""
    result = PeakMemory()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result.bytes = torch.cuda.max_memory_allocated()
        result.method = "torch.cuda.max_memory_allocated: weights + KV cache + activations"
        return
    _trim_heap()
    exact = _reset_rss_peak() and _proc_status_kb("VmHWM") is not None
    before_kb = _proc_status_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield result
    after_kb = _proc_status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result.bytes = max(0, (after_kb or 0) - (before_kb or 0)) * 1024
    result.method = (
        "peak RSS delta (VmHWM reset through /proc/self/clear_refs): KV cache + activations, weights excluded"
        if exact
        else "ru_maxrss delta (lower bound: the process peak only grows): KV cache + activations, weights excluded"
    )


# ---- what is timed -----------------------------------------------------------------------------
class Runner(Protocol):
    """What the timer times: a prefill, and decode runs on top of a ``seq``-token cache
    (``runners.TorchRunner`` and ``runners.OrtRunner``)."""

    def prefill(self) -> Any: ...

    def start_decode(self) -> None: ...

    def decode_run(self) -> Any: ...

    def end_decode(self) -> None: ...


@dataclass
class Measurement:
    prefill: Stats
    decode: Stats  # per token
    peak_memory: PeakMemory


def measure(runner: Runner, device: str, runs: int, warmup: int, decode_tokens: int) -> Measurement:
    """Prefill and per-token decode latency of one runner, and the peak memory over both."""
    sync = synchronizer(device)
    with peak_memory(device) as mem:
        prefill = time_calls(runner.prefill, runs, warmup, sync)
        runner.start_decode()
        decode = time_calls(runner.decode_run, runs, warmup, sync)
        runner.end_decode()
    return Measurement(Stats.from_samples(prefill), Stats.from_samples([t / decode_tokens for t in decode]), mem)


def generation(runner: Any, device: str, new_tokens: int, runs: int) -> dict[str, Any]:
    """Tokens per second of ``runner.generate``: ``new_tokens`` after the runner's prompt,
    prompt processing included (wall time of the whole call), mean over ``runs`` calls."""
    sync = synchronizer(device)
    seconds = [t / 1e3 for t in time_calls(lambda: runner.generate(new_tokens), runs, 0, sync)]
    mean = statistics.fmean(seconds)
    return {
        "new_tokens": new_tokens,
        "runs": runs,
        "seconds": [round(x, 4) for x in seconds],
        "seconds_mean": round(mean, 4),
        "tokens_per_s": round(new_tokens / mean, 3),
    }


# ---- the authors' protocol (paper Table 3) ----------------------------------------------------
PAPER_PROTOCOL = (
    "the authors' latency_test (github.com/kennethzhao24/latency_test, utils.measure_inference_latency): "
    "torch.utils.benchmark.Timer(...).timeit(16).mean, 1 thread, zero input ids, one forward over the prompt; "
    "MeRino and OPT as decoders without the LM head, Pythia, GPT-2 and Cerebras-GPT with it"
)


def paper_latency_ms(fn: Callable[[torch.Tensor], Any], ids: torch.Tensor, runs: int = 16, threads: int = 1) -> float:
    """Mean milliseconds of ``fn(ids)`` as the authors time it: ``Timer.timeit(runs).mean``
    with ``threads`` threads (under inference_mode here; the authors' script kept autograd on)."""
    import torch.utils.benchmark as benchmark

    before = torch.get_num_threads()
    try:
        timer = benchmark.Timer(
            stmt="fn(ids)", globals={"fn": torch.inference_mode()(fn), "ids": ids}, num_threads=threads
        )
        return timer.timeit(runs).mean * 1e3
    finally:
        torch.set_num_threads(before)


# ---- sizes ------------------------------------------------------------------------------------
def weight_bytes_in_memory(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind parameters and buffers: a tied or shared weight is
    counted once, and a copy made by an inference transform would show up here."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def serialized_bytes(model: torch.nn.Module, tmp_dir: Path) -> int:
    """Size of the weights written as safetensors (shared tensors once), measured by writing them."""
    from safetensors.torch import save_model

    path = Path(tmp_dir) / "weights.safetensors"
    save_model(model, str(path))
    size = path.stat().st_size
    path.unlink()
    return size
