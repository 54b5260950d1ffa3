"""The export stage's entry: ``export(ExportSettings) -> Exported``.

A checkpoint becomes a self-contained HF directory (safetensors weights, ``config.json`` with
``auto_map``, the tokenizer and the generated remote code; docs/export.md), optionally with
``model.onnx`` (KV-cache inputs; a GPTQ directory's linears as ``MatMulNBits``). ``merino-pl
export`` (``cli.py``) turns its flags into ``ExportSettings`` and calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import check_out


@dataclass(frozen=True)
class ExportSettings:
    """One export: the checkpoint, where it goes, and what to write beside the weights."""

    checkpoint: str  # a .ckpt from `merino-pl fit`, an exported or GPTQ directory, or a recipe
    out: str  # replaced as one unit (written beside, then renamed into place)
    overwrite: bool = False  # replace ``out`` if it exists and is not empty
    tokenizer: str | None = None  # tokenizer.json to ship (default: the one the model was trained with)
    onnx: bool = False  # also write model.onnx with KV-cache inputs

    def problems(self) -> list[str]:
        """Problems with the paths and the tokenizer, before the model is read (``out`` is
        replaced as a whole, so it must not hold anything this export reads)."""
        from merino_pl.core.tokenizer import load_tokenizer

        problems = []
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
        if (Path(self.checkpoint) / "quantize_config.json").exists() and not self.onnx:
            problems.append(
                f"{self.checkpoint}: a GPTQ directory is already an export (weights, config, tokenizer, "
                "remote code): copy it, or add --onnx to write it with model.onnx"
            )
        return problems + check_out(self.out, overwrite=self.overwrite, protect=protect)


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote."""

    out: Path  # the directory
    onnx: Path | None  # model.onnx inside it, when asked for
    recipe: str
    kind: str  # how the checkpoint was read: hf-dir | lightning-ckpt | recipe | gptq


def export(settings: ExportSettings) -> Exported:
    """Check every argument, then write the directory (and ``model.onnx``); all problems in one
    ``MerinoError`` before the model is read."""
    from merino_pl.core.checkpoint import export_pretrained, load_model, trained_tokenizer  # torch: not for validation

    problems = settings.problems()
    if problems:
        raise MerinoError("; ".join(problems))
    loaded = load_model(settings.checkpoint)
    if loaded.kind == "gptq" and settings.onnx:  # a quantized directory: its files + the packed graph (MatMulNBits)
        from merino_pl.export.onnx import export_quantized_onnx

        out = export_quantized_onnx(loaded, settings.out)
        return Exported(Path(out), Path(out) / "model.onnx", loaded.recipe.name, loaded.kind)
    tokenizer = settings.tokenizer or trained_tokenizer(settings.checkpoint)  # None: GPT-NeoX-20B
    out = Path(export_pretrained(loaded.model, settings.out, tokenizer=tokenizer))
    onnx = None
    if settings.onnx:
        from merino_pl.export.onnx import export_onnx

        onnx = Path(export_onnx(loaded.model, out / "model.onnx"))
    return Exported(out, onnx, loaded.recipe.name, loaded.kind)
