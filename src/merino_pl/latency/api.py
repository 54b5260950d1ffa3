"""The latency stage's entries: ``latency(LatencySettings) -> LatencyReport`` (a model and its
peers on this device) and ``profile(ProfileSettings) -> LatencyTable`` (the device latency table
the search reads).

``merino-pl latency`` / ``merino-pl latency profile`` (``cli.py``, ``profile.py``) turn their
flags into these settings and call them. Every argument is checked before any model is built,
all problems in one ``MerinoError``. Nothing heavy is imported until an entry runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from merino_pl.core.errors import MerinoError

if TYPE_CHECKING:
    from merino_pl.core.latency_table import LatencyTable
    from merino_pl.latency.report import LatencyReport, Options


def _options() -> Options:
    from merino_pl.latency.report import Options

    return Options()


@dataclass(frozen=True)
class LatencySettings:
    """One latency report: what to time (``source``), how (``options``), where it goes."""

    source: str  # a .ckpt, an exported / GPTQ directory, a recipe YAML or a built-in recipe name
    out: str  # directory for latency.json, latency.md (and model-*.onnx)
    options: Options = field(default_factory=_options)
    threads: int | None = None  # torch (and onnxruntime) intra-op threads (None: torch's)

    def problems(self) -> list[str]:
        """Every problem that needs no model (the model's own limits are checked once it is read)."""
        from merino_pl.core.io import check_out

        problems = [] if self.threads is None or self.threads >= 1 else [f"--threads must be >= 1, got {self.threads}"]
        return problems + self.options.problems() + check_out(self.out)


def latency(settings: LatencySettings) -> LatencyReport:
    """Time ``settings.source`` (and its peers) on this device; write ``latency.json`` and
    ``latency.md`` into ``settings.out``; return the report."""
    import torch

    from merino_pl.latency.report import build_report

    problems = settings.problems()
    if problems:
        raise MerinoError("; ".join(problems))
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    report = build_report(settings.source, settings.options, settings.out)
    report.write(settings.out)
    return report


@dataclass(frozen=True)
class ProfileSettings:
    """One device latency table over a search space."""

    out: str  # the table (JSON) to write
    device: str = "cpu"
    space: str | None = None  # search space YAML (None: the shipped search/space.yaml)
    precision: str = "fp32"  # a float precision (core.quant.format.FLOAT_DTYPES)
    batch: int = 1
    seq: int = 128  # tokens per prefill
    runs: int = 16  # timed runs per shape; the table keeps their mean
    warmup: int = 2
    threads: int | None = None

    def problems(self) -> list[str]:
        import torch

        from merino_pl.core.quant.format import FLOAT_DTYPES

        problems = []
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"--device {self.device!r} is not one of cpu, cuda")
        elif self.device.startswith("cuda") and not torch.cuda.is_available():
            problems.append(f"--device {self.device}: no CUDA device is available here")
        if self.precision not in FLOAT_DTYPES:
            problems.append(
                f"--precision {self.precision!r} is not one of {', '.join(FLOAT_DTYPES)} "
                "(INT8/INT4 layers are not profiled)"
            )
        for name in ("batch", "seq", "runs"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            problems.append(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads must be >= 1, got {self.threads}")
        if self.space is not None and not Path(self.space).is_file():
            problems.append(f"search space not found: {self.space}")
        return problems


def profile(settings: ProfileSettings) -> LatencyTable:
    """Time every layer shape and projection of the search space on this device; write the
    table to ``settings.out`` and return it."""
    import torch

    from merino_pl.core.space import load_space
    from merino_pl.latency.profile import profile_space

    problems = settings.problems()
    if problems:
        raise MerinoError("; ".join(problems))
    space = load_space(settings.space)  # MerinoError naming the file when missing / malformed
    if settings.threads:
        torch.set_num_threads(settings.threads)
    s = settings
    table = profile_space(space, s.device, s.precision, s.batch, s.seq, s.runs, s.warmup)
    table.save(s.out)
    return table
