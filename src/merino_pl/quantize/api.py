"""The quantize stage's entry: ``quantize(settings: QuantizeSettings) -> QuantizeReport``.

``merino-pl quantize`` (``cli.py``) turns its flags (and a ``--config`` preset) into one
``QuantizeSettings`` (a ``QuantSpec``, a ``CalibrationSettings``, the paths) and calls
``quantize``; so does any other stage that needs a quantized model (latency's on-the-fly int
rows, passing the model it already holds as ``loaded``). Every argument is checked before the
model is read (``QuantizeSettings.problems``) and again against the architecture once it is
(``validate_for_model``), all problems in one ``MerinoError``.

This module imports no torch at import time: ``quantize --help`` and the pipeline's argument
check load only what they show.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import check_out
from merino_pl.core.quant.spec import EMBEDDINGS, FLOAT_DTYPE_NAMES, SUPPORTED_BITS, QuantSpec
from merino_pl.core.tracking import log_report

if TYPE_CHECKING:
    import torch

    from merino_pl.core.checkpoint import LoadedModel
    from merino_pl.quantize.report import QuantizeReport

METHODS = ("gptq", "rtn")


DEFAULT_SEQ_LEN = 512  # calibration window when --seq-len is not given (capped at the model's context)


@dataclass(frozen=True)
class CalibrationSettings:
    """Where the calibration windows (and the held-out check's) come from, and their shape."""

    source: str = "embedded"  # any data-stage source: embedded, files, glob, directory, hub name
    text_field: str = "text"  # text field of jsonl / parquet rows
    nsamples: int = 128  # calibration windows (GPTQ; RTN reads none)
    seq_len: int | None = None  # tokens per window; None: DEFAULT_SEQ_LEN, or the model's trained context if shorter
    holdout: int = 8  # held-out windows for the float-vs-quantized check
    batch_size: int = 8  # windows per calibration forward
    seed: int = 0  # of the window draw


@dataclass(frozen=True)
class QuantizeSettings:
    """One quantization run: what ``quantize`` takes, gathered so it can be checked up front."""

    checkpoint: str
    spec: QuantSpec
    calib: CalibrationSettings = field(default_factory=CalibrationSettings)
    out: str | None = None  # default: beside the checkpoint (``default_out``)
    float_dtype: str = "float16"  # torch's name of the dtype the unquantized tensors are stored in
    tokenizer: str | None = None  # tokenizer.json (default: the model's own, else the shipped GPT-NeoX-20B)
    overwrite: bool = False
    wandb: str | None = None  # W&B project to log the report to, linked to the training run (core.tracking)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else default_out(self.checkpoint, self.spec)

    def problems(self, pending: frozenset[str] = frozenset()) -> list[str]:
        """Every problem that needs no model (all at once); ``pending``: paths an earlier
        pipeline stage will write (not missing, only not there yet)."""
        spec, c, problems = self.spec, self.calib, []
        if spec.bits not in SUPPORTED_BITS:
            problems.append(f"--bits {spec.bits} is not supported (valid: {', '.join(map(str, SUPPORTED_BITS))})")
        if spec.group_size != -1 and spec.group_size <= 0:
            problems.append(f"--group-size {spec.group_size}: must be positive or -1 (per channel)")
        if spec.method not in METHODS:
            problems.append(f"--method {spec.method!r} (valid: {', '.join(METHODS)})")
        for flag, value in (
            ("nsamples", c.nsamples),
            ("seq_len", c.seq_len),
            ("batch_size", c.batch_size),
            ("block_size", spec.block_size),
        ):
            if value is not None and value <= 0:
                problems.append(f"--{flag.replace('_', '-')} {value}: must be positive")
        if self.float_dtype not in FLOAT_DTYPE_NAMES:
            problems.append(f"--float-dtype {self.float_dtype!r} (valid: {', '.join(FLOAT_DTYPE_NAMES)})")
        if spec.embedding not in EMBEDDINGS:
            problems.append(f"--embedding {spec.embedding!r} (valid: {', '.join(EMBEDDINGS)})")
        if c.holdout < 0 or not 0 <= spec.damp_percent < 1:
            problems.append(
                f"--holdout must be >= 0 and --damp-percent in [0, 1) (got {c.holdout}, {spec.damp_percent})"
            )
        ckpt = Path(self.checkpoint)
        # (a bare name may be a built-in recipe)
        if not ckpt.exists() and self.checkpoint not in pending and (ckpt.suffix == ".ckpt" or "/" in self.checkpoint):
            problems.append(f"checkpoint not found: {ckpt}")
        return problems


def default_out(checkpoint: str | Path, spec: QuantSpec) -> Path:
    """``<checkpoint>-<method>-int<bits>-g<group>`` (``-pc`` per channel) beside the checkpoint."""
    ckpt = Path(checkpoint)
    g = "pc" if spec.group_size == -1 else f"g{spec.group_size}"
    return ckpt.with_name(f"{ckpt.stem}-{spec.method}-int{spec.bits}-{g}")


def _widths(arch: Any) -> list[int]:
    return sorted({w for b in arch.blocks for w in (b.embed_dim, b.ffn)})  # in- and out-features of every linear


def validate_for_model(spec: QuantSpec, calib: CalibrationSettings, arch: Any) -> list[str]:
    """Problems that depend on the architecture (packing vs widths, seq_len). A group larger
    than a layer's input width is not one: that layer gets one group per row (``group_note``)."""
    problems = []
    widths = _widths(arch)
    if spec.bits in SUPPORTED_BITS and any(w % (32 // spec.bits) for w in widths):
        problems.append(
            f"layer widths {widths} must be multiples of {32 // spec.bits} to pack {spec.bits}-bit codes in int32"
        )
    if calib.seq_len is not None and calib.seq_len > arch.max_position_embeddings:
        problems.append(
            f"--seq-len {calib.seq_len} exceeds the model's max_position_embeddings {arch.max_position_embeddings}"
        )
    return problems


def group_note(group_size: int, arch: Any) -> str | None:
    """What the group size means for layers it does not fit, or None when it divides every width.

    The format keeps one global ``group_size`` (as auto-gptq / GPTQModel write and read it) and
    every reader sizes a layer's scales as ``ceil(in / group_size)`` groups: a layer narrower
    than the group has one group per row (its whole input width), one whose width the group
    does not divide has a shorter last group.
    """
    if group_size == -1:
        return None
    widths = _widths(arch)
    narrow = [w for w in widths if w < group_size]
    ragged = [w for w in widths if w > group_size and w % group_size]
    parts = []
    if narrow:
        parts.append(
            f"layers with {' / '.join(map(str, narrow))} inputs are narrower than --group-size {group_size}: "
            "one group per row there (the layer's whole input width, as GPTQ tools do)"
        )
    if ragged:
        parts.append(f"--group-size {group_size} does not divide input widths {ragged}: their last group is shorter")
    if not parts:
        return None
    return (
        "note: " + "; ".join(parts) + " (valid GPTQ v1 with the global group_size, as auto-gptq / GPTQModel read it; "
        "fixed-shape kernels such as Marlin need a group that divides every width)"
    )


def quantize(settings: QuantizeSettings, *, loaded: LoadedModel | None = None, verbose: bool = True) -> QuantizeReport:
    """Quantize the float model ``settings.checkpoint`` (a ``.ckpt``, an exported directory, a
    recipe), or ``loaded``, that model already in memory (copied, not changed), as
    ``settings.spec`` says, calibrated on ``settings.calib``, into the GPTQ v1 directory
    ``settings.out_dir`` with ``quantize_report.{json,md}``; returns the report. The model's own
    tokenizer (its directory's ``tokenizer.json``, or the one its ``.ckpt`` records) tokenizes the
    calibration text and ships with the result unless ``settings.tokenizer`` names another.

    Every problem with the settings, the checkpoint and the calibration data is found before any
    quantization starts and raised as one ``MerinoError``; so is a run already writing the same
    ``out`` (``core.lock``: held from the checks to the final rename). ``verbose``: print what runs and show
    progress bars.
    """
    import copy

    from merino_pl.core.lock import locked_output

    if settings.tokenizer is None and Path(settings.checkpoint).exists():  # calibrate with, and ship, the model's own
        from merino_pl.core.checkpoint import trained_tokenizer  # torch + transformers: only for a real file

        settings = dataclasses.replace(settings, tokenizer=trained_tokenizer(settings.checkpoint))
    problems = settings.problems(pending=frozenset({settings.checkpoint}) if loaded else frozenset())
    out_dir, spec = settings.out_dir, settings.spec
    protect = [
        (p, what)
        for p, what in [
            (settings.checkpoint, "the checkpoint being quantized"),
            (settings.calib.source, "the --calib data"),
            (settings.tokenizer, "the --tokenizer file"),
        ]
        if p and Path(p).exists()
    ]
    problems += check_out(out_dir, overwrite=settings.overwrite, protect=protect)
    with contextlib.ExitStack() as stack:
        if not problems:  # one writer per --out: a second run is one line naming the first
            # (a failure, Ctrl-C included, leaves no folder of its own behind; the old --out stays)
            stack.enter_context(locked_output(out_dir, f"merino-pl quantize {settings.checkpoint}"))
            # again, under the lock: a run that held it until now may have written --out meanwhile
            problems += check_out(out_dir, overwrite=settings.overwrite, protect=protect)
        if loaded:  # quantization changes the model in place: the caller's stays as it was
            loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
        loaded, ids, held, tokenize_s, problems, settings = _load_inputs(settings, problems, loaded, verbose)
        if problems:
            raise MerinoError("; ".join(problems))
        from merino_pl.quantize.run import quantize_checkpoint  # torch + transformers: once all is checked

        note = group_note(spec.group_size, loaded.recipe.architecture)
        if verbose:
            print(f"quantize {loaded.recipe.name} ({loaded.kind}) -> {out_dir}: {spec}")
            if note:
                print(note)
        report = quantize_checkpoint(
            loaded,
            spec,
            ids,
            held,
            out_dir,
            settings.calib,
            settings.float_dtype,
            settings.tokenizer,
            tokenize_seconds=tokenize_s,
            group_note=note,
            progress=verbose,
        )
    # the offline run beside the GPTQ directory, not in it (a re-run with --overwrite replaces it)
    log_report(settings.wandb, out_dir / report.json_name, settings.checkpoint, "quantize", out_dir.parent)
    return report


def _load_inputs(
    s: QuantizeSettings, problems: list[str], loaded: LoadedModel | None = None, progress: bool = True
) -> tuple[LoadedModel, torch.Tensor, torch.Tensor, float, list[str], QuantizeSettings]:
    """The model, the calibration and held-out windows and the seconds spent reading +
    tokenizing them, collecting their problems with the ones found so far; and the settings with
    the calibration window resolved (no --seq-len: ``DEFAULT_SEQ_LEN``, or the model's trained
    context / positions when shorter)."""
    from merino_pl.quantize.calibration import calibration_tokens, check_source

    calib, held, tokenize_s = None, None, 0.0
    if not any(p.startswith("checkpoint not found") for p in problems):
        from merino_pl.core.checkpoint import load_model  # torch + transformers: a model to read

        try:
            loaded = loaded or load_model(s.checkpoint)
            s = _resolve_seq_len(s, loaded)
            if loaded.kind == "gptq":
                bits = loaded.model.config.quantization_config.get("bits")
                problems.append(
                    f"{s.checkpoint} is already a GPTQ int{bits} directory (quantize_config.json); "
                    "quantize the float model it came from (the exported directory or the .ckpt)"
                )
            else:
                problems += validate_for_model(s.spec, s.calib, loaded.recipe.architecture)
                if _calibration_windows(s):  # text feeds the model
                    problems += _vocab_problems(s, loaded)
        except MerinoError as e:
            problems.append(str(e))
    if s.calib.seq_len is None:  # the model did not load: the error says why; nothing is tokenized
        s = dataclasses.replace(s, calib=dataclasses.replace(s.calib, seq_len=DEFAULT_SEQ_LEN))
    c = s.calib
    n_calib = c.nsamples if s.spec.method == "gptq" else 0
    if problems and (n_calib or c.holdout > 0):  # it will not run: check the source, tokenize nothing
        try:
            check_source(c.source, c.text_field)
        except MerinoError as e:
            problems.append(str(e))
    elif (n_calib or c.holdout > 0) and c.seq_len > 0 and c.nsamples > 0 and c.holdout >= 0:
        t0 = time.perf_counter()
        try:
            # no bar once a problem is known: the error must stay the only line on stderr
            calib, held = calibration_tokens(
                c.source,
                n_calib,
                c.seq_len,
                c.holdout,
                s.tokenizer,
                c.text_field,
                c.seed,
                progress=progress and not problems,
            )
            tokenize_s = time.perf_counter() - t0
        except MerinoError as e:
            problems.append(str(e))
    elif not problems:
        import torch

        calib = held = torch.zeros(0, max(c.seq_len, 0), dtype=torch.long)
    return loaded, calib, held, tokenize_s, problems, s


def _resolve_seq_len(s: QuantizeSettings, loaded: LoadedModel) -> QuantizeSettings:
    """No --seq-len given: ``DEFAULT_SEQ_LEN`` tokens, fewer for a model trained on (or holding)
    a shorter context, whose positions past it never got a gradient."""
    if s.calib.seq_len is not None:
        return s
    from merino_pl.core.checkpoint import context_window  # eval's default window: the same rule

    seq_len = min(DEFAULT_SEQ_LEN, context_window(loaded)[0])
    return dataclasses.replace(s, calib=dataclasses.replace(s.calib, seq_len=seq_len))


def _calibration_windows(s: QuantizeSettings) -> int:
    """Windows of text the run feeds the model: GPTQ's calibration (RTN reads none) + the held-out check."""
    return (s.calib.nsamples if s.spec.method == "gptq" else 0) + max(s.calib.holdout, 0)


def _vocab_problems(s: QuantizeSettings, loaded: LoadedModel) -> list[str]:
    """The tokenizer that calibrates and ships with the result must fit the model's embedding (one
    line naming both sizes); one that does not load is reported by the calibration."""
    from merino_pl.core.tokenizer import check_vocab, load_tokenizer

    try:
        tok = load_tokenizer(s.tokenizer)
    except MerinoError:
        return []
    try:
        check_vocab(tok, loaded.recipe.architecture.vocab_size, s.checkpoint, s.tokenizer)
    except MerinoError as e:
        return [str(e)]
    return []
