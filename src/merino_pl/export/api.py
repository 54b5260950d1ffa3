"""The export stage's entry: ``export(ExportSettings) -> Exported``.

A checkpoint becomes a self-contained HF directory (safetensors weights, ``config.json`` with
``auto_map``, the tokenizer the model was trained with and the generated remote code;
docs/export.md), optionally with ``model.onnx`` (KV-cache inputs; a GPTQ directory's linears as
``MatMulNBits``) and ExecuTorch programs (``model.pte``, ``model-8da4w.pte``: ``executorch.py``).
Everything is built in one directory beside ``out`` and renamed into place as one unit: an
interrupted export (kill -9 in the ONNX step) leaves the old complete export. ``merino-pl
export`` (``cli.py``) turns its flags into ``ExportSettings`` and calls it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import check_out
from merino_pl.export.session import GRAPH_NAME

PTE_FILES = {"fp32": "model.pte", "8da4w": "model-8da4w.pte"}  # the ExecuTorch programs --executorch writes, by kind


def executorch_missing() -> str | None:
    """Why ExecuTorch output cannot be written or run in this interpreter (None when it can)."""
    import importlib.util

    for module in ("executorch", "torchao"):
        if importlib.util.find_spec(module) is None:
            return (
                f"ExecuTorch needs the {module!r} package, not installed here: `make executorch-env` builds "
                '.venv/executorch (then run .venv/executorch/bin/merino-pl), or pip install "merino-pl[executorch]"'
            )
    return None


@dataclass(frozen=True)
class ExportSettings:
    """One export: the checkpoint, where it goes, and what to write beside the weights."""

    checkpoint: str  # a .ckpt from `merino-pl fit`, an exported or GPTQ directory, or a recipe
    out: str  # replaced as one unit (written beside, then renamed into place)
    overwrite: bool = False  # replace ``out`` if it exists and is not empty
    tokenizer: str | None = None  # tokenizer.json to ship (default: the one the model was trained with)
    onnx: bool = False  # also write model.onnx with KV-cache inputs
    executorch: tuple[str, ...] = ()  # ExecuTorch programs to write: "fp32" -> model.pte, "8da4w" -> model-8da4w.pte

    def problems(self, pending: frozenset[str] = frozenset()) -> list[str]:
        """Problems with the paths, the tokenizer and the outputs asked for, before the model is
        read (``out`` is replaced as a whole, so it must not hold anything this export reads);
        ``pending``: paths an earlier pipeline stage will write (not there yet, not missing)."""
        from merino_pl.core.config import model_source_problems
        from merino_pl.core.tokenizer import load_tokenizer

        problems = []
        if self.tokenizer is not None:
            try:
                load_tokenizer(self.tokenizer)
            except MerinoError as e:
                problems.append(str(e))
        protect = [
            (p, what)
            for p, what in [
                (self.checkpoint, "the checkpoint being exported"),
                (self.tokenizer, "the --tokenizer file"),
            ]
            if p and Path(p).exists()
        ]
        gptq = (Path(self.checkpoint) / "quantize_config.json").exists()
        if gptq and not self.onnx:
            problems.append(
                f"{self.checkpoint}: a GPTQ directory is already an export (weights, config, tokenizer, "
                "remote code): copy it, or add --onnx to write it with model.onnx"
            )
        if unknown := [k for k in self.executorch if k not in PTE_FILES]:
            problems.append(
                f"--executorch {','.join(unknown)}: expected {' and/or '.join(PTE_FILES)} (comma-separated)"
            )
        elif self.executorch and gptq:
            problems.append(
                f"--executorch {self.checkpoint}: export the float model (8da4w quantizes it for ExecuTorch)"
            )
        elif self.executorch and (why := executorch_missing()) is not None:
            problems.append(f"--executorch: {why}")
        problems += [] if self.checkpoint in pending else model_source_problems(self.checkpoint)
        return problems + check_out(self.out, overwrite=self.overwrite, protect=protect)


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote."""

    out: Path  # the directory
    onnx: Path | None  # model.onnx inside it, when asked for
    recipe: str
    kind: str  # how the checkpoint was read: hf-dir | lightning-ckpt | recipe | gptq
    pte: tuple[Path, ...] = ()  # the ExecuTorch programs inside it, when asked for
    tokenizer: str | None = None  # the tokenizer shipped (a path or a hub name); None: the GPTQ directory's own


def export(settings: ExportSettings) -> Exported:
    """Check every argument, then write the directory (and ``model.onnx``, the ``.pte`` files);
    all problems in one ``MerinoError`` before the model is read."""
    problems = settings.problems()
    if problems:
        raise MerinoError("; ".join(problems))
    from merino_pl.core.checkpoint import load_model  # torch: only once the arguments are checked
    from merino_pl.core.lock import locked_output
    from merino_pl.core.tokenizer import model_tokenizer

    tokenizer = settings.tokenizer or model_tokenizer(
        settings.checkpoint
    )  # never the default in place of a recorded one
    loaded = load_model(settings.checkpoint)
    # one writer per --out; a failure leaves no folder of its own behind (the old --out stays)
    with locked_output(settings.out, f"merino-pl export {settings.checkpoint}"):
        if loaded.kind == "gptq" and settings.onnx:  # a quantized directory: its files + the packed graph
            from merino_pl.export.onnx import export_quantized_onnx

            out = export_quantized_onnx(loaded, settings.out)
            return Exported(Path(out), Path(out) / GRAPH_NAME, loaded.recipe.name, loaded.kind)
        out, onnx, pte = _write(loaded.model, settings, tokenizer)
    return Exported(out, onnx, loaded.recipe.name, loaded.kind, pte, tokenizer)


def _write(model, settings: ExportSettings, tokenizer: str) -> tuple[Path, Path | None, tuple[Path, ...]]:
    """The whole export built in one temp directory beside ``out``, then swapped in at once."""
    from merino_pl.core.checkpoint import WEIGHTS_NAME, write_pretrained
    from merino_pl.core.io import atomic_dir, sha256_file

    out = Path(settings.out)
    with atomic_dir(out) as tmp:
        write_pretrained(model, tmp, tokenizer)
        if Path(tokenizer).is_file():  # ship that file byte for byte (transformers re-serializes it)
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        if settings.onnx:
            from merino_pl.export.onnx import export_onnx

            export_onnx(model, tmp / GRAPH_NAME, weights_sha256=sha256_file(tmp / WEIGHTS_NAME))
        if settings.executorch:
            from merino_pl.export.executorch import export_pte

            for kind in settings.executorch:
                export_pte(model, tmp / PTE_FILES[kind], kind)
    onnx = out / GRAPH_NAME if settings.onnx else None
    return out, onnx, tuple(out / PTE_FILES[k] for k in settings.executorch)
