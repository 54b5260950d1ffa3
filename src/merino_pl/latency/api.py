"""The latency stage's entries: ``latency(LatencySettings) -> LatencyReport`` (a model and its
peers on this device) and ``profile(ProfileSettings) -> LatencyTable`` (the device latency table
the search reads).

``merino-pl latency`` / ``merino-pl latency profile`` (``cli.py``) turn their flags into these
settings and call them. Every argument is checked once, before any model is built, all problems
in one ``MerinoError``; what needs the model (its context, a GPTQ directory's one precision) is
checked as soon as it is read, before any timing. Nothing heavy is imported until an entry runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merino_pl.core.errors import MerinoError
from merino_pl.latency.options import INT_BITS, PTE_KINDS, Options, device_problems

if TYPE_CHECKING:
    import torch

    from merino_pl.core.checkpoint import LoadedModel
    from merino_pl.core.latency_table import LatencyTable
    from merino_pl.latency.measure import ReportBuilder
    from merino_pl.latency.report import LatencyReport


@dataclass(frozen=True)
class LatencySettings:
    """One latency report: what to time (``source``), how (``options``), where it goes."""

    source: str  # a .ckpt, an exported / GPTQ directory, a recipe YAML or a built-in recipe name
    out: str  # directory for latency.json, latency.md (and model-*.onnx)
    options: Options = field(default_factory=Options)
    threads: int | None = None  # torch (and onnxruntime) intra-op threads (None: torch's)
    wandb: str | None = None  # W&B project to log the report to, linked to the training run (core.tracking)

    def problems(self) -> list[str]:
        """Every problem that needs no model (the model's own limits are checked once it is read)."""
        from merino_pl.core.io import check_out

        problems = [] if self.threads is None or self.threads >= 1 else [f"--threads must be >= 1, got {self.threads}"]
        return problems + self.options.problems() + check_out(self.out)


def latency(
    settings: LatencySettings,
    peer_factory: Callable[[str], torch.nn.Module] | None = None,
    tegra_release: Path | None = None,
) -> LatencyReport:
    """Time ``settings.source`` (and its peers) on this device; write ``latency.json`` and
    ``latency.md`` into ``settings.out``; return the report. ``peer_factory`` builds a peer by
    name (default: from its published config); ``tegra_release`` is where a Jetson says so."""
    import torch

    from merino_pl.core.checkpoint import load_model
    from merino_pl.core.lock import locked_output
    from merino_pl.core.tracking import log_report
    from merino_pl.latency import device, peers
    from merino_pl.latency.measure import ReportBuilder

    problems = settings.problems()
    if problems:
        raise MerinoError("; ".join(problems))
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    loaded = load_model(settings.source, seed=settings.options.seed)
    opts = fit_to_model(settings.options, loaded, settings.source)
    out = Path(settings.out)
    # one writer per --out; a failure removes what this run created: an --out it made, else its new files
    with locked_output(out, f"merino-pl latency {settings.source}", output_names(opts)):
        out.mkdir(parents=True, exist_ok=True)
        builder = ReportBuilder(loaded, opts, out, peer_factory or peers.build_peer)
        builder.warnings += _warnings(opts)
        try:
            _measure(builder, opts)
        finally:
            builder.close()
        report = assemble(loaded, opts, builder, tegra_release or device.TEGRA_RELEASE)
        report.write(out)
    log_report(settings.wandb, out / "latency.json", settings.source, "latency")
    return report


def output_names(opts: Options) -> list[str]:
    """The files a report run writes into ``--out``: the report, the graphs and the programs."""
    from merino_pl.latency.measure import GRAPH_NAME
    from merino_pl.latency.pte_rows import PTE_NAME
    from merino_pl.latency.report import JSON_NAME, MARKDOWN_NAME

    graphs = [GRAPH_NAME.format(precision=p) for p in opts.precisions]
    return [JSON_NAME, MARKDOWN_NAME, *graphs, *(PTE_NAME.format(kind=k) for k in PTE_KINDS.values())]


@contextlib.contextmanager
def new_folders_undone(folder: str | Path, contents: bool = False) -> Iterator[None]:
    """For a stage that writes one file (``latency profile``'s table, ``latency import``'s table or
    report) rather than into a locked ``--out`` folder (``core.lock.locked_output``): when the
    ``with`` block fails (a full disk, an interruption), the folders it created for ``folder`` are
    removed again: ``folder`` itself with what this run wrote into it (``contents``), then each
    parent this run created, while empty. A folder that existed before is never touched."""
    created, path = [], Path(os.path.abspath(folder))
    while not path.exists():
        created.append(path)  # deepest first
        path = path.parent
    try:
        yield
    except BaseException:
        for i, d in enumerate(created):
            if i == 0 and contents:
                shutil.rmtree(d, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    d.rmdir()  # only while empty
        raise


def fit_to_model(opts: Options, loaded: LoadedModel, source: str) -> Options:
    """The options this model can be timed with: a ``MerinoError`` when the prompt and decode
    steps exceed its context or a GPTQ directory is asked for another precision; generation
    clipped to the context (with a note saying so)."""
    from merino_pl.core.checkpoint import trained_context

    problems, name = [], loaded.recipe.name
    positions = loaded.recipe.architecture.max_position_embeddings
    trained = trained_context(loaded)  # positions past it never got a gradient: not the deployed model
    limit = min(trained, positions) if trained else positions
    what = f"trained context of {limit} tokens ({positions} positions)" if trained else f"{limit} positions"
    if not opts.seq_given and opts.seq + opts.decode_tokens > limit > opts.decode_tokens:
        shorter = limit - opts.decode_tokens  # the paper's 128-token prompt does not fit with the decode steps
        note = (
            f"prompt: {shorter} tokens, not the paper's {opts.seq} ({name}'s {what}, {opts.decode_tokens} decode steps)"
        )
        opts = dataclasses.replace(opts, seq=shorter, notes=[*opts.notes, note])
    if opts.seq + opts.decode_tokens > limit:
        problems.append(f"--seq {opts.seq} + --decode-tokens {opts.decode_tokens} exceeds {name}'s {what}")
    bits = int(loaded.model.config.quantization_config["bits"]) if loaded.kind == "gptq" else None
    other = [p for p in opts.precisions if bits is not None and p != f"int{bits}"]
    if other:  # a GPTQ directory holds one precision: any other would be an empty row
        problems.append(
            f"--precision {','.join(other)}: {source} is a GPTQ int{bits} directory, timed only at --precision "
            f"int{bits} (time the float model for the other precisions)"
        )
    if problems:
        raise MerinoError("; ".join(problems))
    if opts.generate_tokens and opts.seq + opts.generate_tokens > limit and opts.seq < limit:
        clipped = (
            f"generation: {limit - opts.seq} new tokens, not --generate-tokens {opts.generate_tokens} ({name}'s {what})"
        )
        opts = dataclasses.replace(opts, generate_tokens=limit - opts.seq, notes=[*opts.notes, clipped])
    return opts


def _warnings(opts: Options) -> list[str]:
    """What the reader of these rows must know before trusting them."""
    out = []
    slow = [p for p in opts.precisions if p in ("fp16", "bf16")]
    if slow and not opts.device.startswith("cuda"):
        out.append(
            f"{','.join(slow)} on CPU: allowed, but CPUs without native half units emulate it "
            "(bf16 measured ~11x slower than fp32 on an AVX2-only CPU); time it on the target GPU"
        )
    if any(p in INT_BITS for p in opts.precisions) and "full" in opts.protocols:
        out.append(
            "int rows on torch: only the packed weights stay resident; each block's weights are dequantized "
            "into a reused workspace when the block runs (fp32 GEMMs: torch's CPU int kernels are slower here). "
            "The fast int path is onnxruntime's MatMulNBits (--runtime onnxruntime)"
        )
    return out


def _measure(builder: ReportBuilder, opts: Options) -> None:
    """Every row: the full protocol per precision (float or int), then the paper protocol (float only)."""
    ints = [p for p in opts.precisions if p in INT_BITS]
    if "paper" in opts.protocols and ints:
        builder.skipped.append(
            {"row": f"paper protocol {','.join(ints)}", "reason": "the authors time float models only"}
        )
    if "full" in opts.protocols:
        for p in opts.precisions:
            if p in INT_BITS:
                builder.integer(p)
            else:
                builder.precision(p)
    if "paper" in opts.protocols:
        for p in (p for p in opts.precisions if p not in INT_BITS):
            builder.paper(p)


def assemble(loaded: LoadedModel, opts: Options, b: ReportBuilder, tegra_release: Path) -> LatencyReport:
    """The report of the measured rows: versions, device, ratios, checks and warnings."""
    import torch
    import transformers

    from merino_pl.latency import ratios
    from merino_pl.latency.device import describe_device
    from merino_pl.latency.report import LatencyReport

    name, rows = loaded.recipe.name, b.rows
    paper = {"rows": b.paper_rows, "speedups": ratios.paper_speedups(b.paper_rows, name)} if b.paper_rows else None
    mismatches = [
        f"{c['compared']} ({c['precision']}): {c['tolerance_on']} {c[c['tolerance_on']]:.2e} > {c['tolerance']}"
        for c in b.checks
        if not c["match"]
    ]
    return LatencyReport(
        model=model_info(loaded, opts.seq),
        device=describe_device(opts.device, tegra_release),
        torch=torch.__version__,
        transformers=transformers.__version__,
        onnxruntime=_onnxruntime_version() if opts.onnx else None,
        executorch=_version("executorch") if "executorch" in opts.runtimes else None,
        precisions=list(opts.precisions),
        protocol=opts.protocol(),
        rows=rows,
        generation=b.generation,
        paper_protocol=paper,
        speedups=ratios.speedups(rows, name),
        fast_path=ratios.fast_path_gains(rows),
        checks=b.checks,
        skipped=b.skipped,
        warnings=b.warnings + opts.notes + ratios.spread_warnings(rows) + mismatches,
    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def model_info(loaded: LoadedModel, seq: int) -> dict[str, Any]:
    """The report's ``model``: what was timed, its size and FLOPs."""
    from merino_pl.core.costs import count_flops

    arch = loaded.recipe.architecture
    return {
        "name": loaded.recipe.name,
        "kind": loaded.kind,
        "path": loaded.path,
        "weights_sha256": loaded.weights_sha256,
        "size_on_disk_bytes": size_on_disk(loaded),
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "flops_g": count_flops(arch) / 1e9,  # paper convention: 1024 tokens, no LM head
        "flops_prefill_g": count_flops(arch, seq_len=seq, include_lm_head=True) / 1e9,
        "architecture": arch.to_dict(),
    }


def size_on_disk(loaded: LoadedModel) -> int | None:
    """Bytes of the weight files the model was loaded from (None for a recipe: nothing on disk)."""
    path = Path(loaded.path)
    if loaded.kind == "recipe":
        return None
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))
    return path.stat().st_size


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
    runtime: str = "torch"  # or "onnxruntime": the kit's ONNX graphs through onnxruntime, on the CPU

    def problems(self) -> list[str]:
        from merino_pl.core.quant.format import FLOAT_DTYPES

        problems = device_problems(self.device)
        if self.runtime not in ("torch", "onnxruntime"):
            problems.append(f"--runtime {self.runtime!r} is not one of torch, onnxruntime")
        elif self.runtime == "onnxruntime" and (self.device != "cpu" or self.precision != "fp32"):
            problems.append(
                f"--runtime onnxruntime profiles fp32 on the cpu here, not --device {self.device} "
                f"--precision {self.precision} (time other providers on the device with `latency kit`)"
            )
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
    with new_folders_undone(Path(s.out).parent):  # the table is written atomically: no partial file
        table = profile_space(
            space, s.device, s.precision, s.batch, s.seq, s.runs, s.warmup, runtime=s.runtime, threads=s.threads
        )
        table.save(s.out)
    return table
