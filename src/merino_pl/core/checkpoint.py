"""Load a model from whatever a user points at, and export self-contained HF directories.

Accepted by every stage that reads a model (eval, quantize, latency, export):

* an exported directory (``config.json`` + ``model.safetensors``), e.g. from ``merino-pl export``;
* a Lightning checkpoint (``*.ckpt``) written by ``merino-pl fit``: it carries the recipe under
  ``checkpoint["merino"]["recipe"]`` and the ``MerinoForCausalLM`` weights under the prefix
  ``model.`` of ``state_dict``; loaded with ``torch.load(weights_only=True)``;
* a recipe (YAML path or built-in name): a freshly initialised model (latency, smoke tests);
* a GPTQ directory written by ``merino-pl quantize`` (``quantize_config.json`` present): the
  model with its quantized linears as ``merino_pl.core.quant.qlinear.QuantLinear`` (kind ``"gptq"``).

Directories written here (``export_pretrained``) and by ``merino-pl quantize`` carry the remote
code, token ids and tokenizer that transformers, lm-eval and the GPTQ loaders need without
merino-pl (``save_model_files``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from merino_pl.core.config import Recipe, load_recipe
from merino_pl.core.errors import MerinoError
from merino_pl.core.hf import MerinoForCausalLM, MerinoHFConfig
from merino_pl.core.io import atomic_dir, sha256_file

WEIGHTS_NAME = "model.safetensors"


@dataclass
class LoadedModel:
    model: MerinoForCausalLM
    recipe: Recipe
    kind: str  # "hf-dir" | "lightning-ckpt" | "recipe" | "gptq"
    path: str
    weights_sha256: str | None  # of the file the weights came from; None for a fresh init


def load_model(path_or_recipe: str | Path, seed: int = 0) -> LoadedModel:
    """Load a model from an exported dir, a ``.ckpt`` or a recipe (see module docstring)."""
    path = Path(path_or_recipe)
    if path.is_dir():
        if (path / "quantize_config.json").exists():
            return _load_gptq_dir(path)
        return _load_hf_dir(path)
    if path.suffix == ".ckpt":
        if not path.exists():
            raise MerinoError(f"checkpoint not found: {path}")
        return _load_lightning_ckpt(path)
    if path.suffix in (".yaml", ".yml") or not path.exists():
        recipe = load_recipe(path_or_recipe)  # raises a MerinoError naming the file if missing
        torch.manual_seed(seed)
        return LoadedModel(MerinoForCausalLM.from_recipe(recipe), recipe, "recipe", str(path), None)
    raise MerinoError(f"{path}: expected an exported model directory, a .ckpt file or a recipe YAML")


def _load_hf_dir(path: Path) -> LoadedModel:
    if not (path / "config.json").exists():
        raise MerinoError(f"{path}: not a model directory (no config.json)")
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        raise MerinoError(f"{path}: no {WEIGHTS_NAME} (only safetensors weights are loaded)")
    check_safetensors(weights)
    check_config_json(path / "config.json")
    try:
        config = MerinoHFConfig.from_pretrained(path)
    except (ValueError, TypeError, OSError) as e:
        raise MerinoError(f"{path}/config.json: {e}") from None
    check_shapes(weights, config)
    try:
        with _quiet_transformers():
            model = MerinoForCausalLM.from_pretrained(path, config=config)
    except RuntimeError as e:  # size mismatch: weights of another architecture than config.json
        raise MerinoError(f"{path}: weights do not match the architecture in config.json: {_first_line(e)}") from None
    recipe = Recipe(config.recipe_name or path.name, config.arch, dict(config.provenance))
    return LoadedModel(model.eval(), recipe, "hf-dir", str(path), sha256_file(weights))


def check_config_json(path: Path) -> None:
    """A ``config.json`` that is not an object holding an ``architecture`` mapping is one line
    naming the file (transformers would fill the gaps with defaults: a wrong model, silently)."""
    from merino_pl.core.io import read_json

    data = read_json(path, "model config")
    if not isinstance(data, dict):
        raise MerinoError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if not isinstance(data.get("architecture"), dict):
        got = "no 'architecture'" if "architecture" not in data else f"'architecture' is {data['architecture']!r}"
        raise MerinoError(f"{path}: not a MeRino config ({got}; expected the mapping merino-pl export writes)")


def check_shapes(weights: Path, config: MerinoHFConfig) -> None:
    """One line naming the first tensor whose shape differs from what ``config.json`` builds, read
    from the safetensors header before transformers prints its multi-line load report."""
    from safetensors import safe_open

    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {k: tuple(v.shape) for k, v in MerinoForCausalLM(config).state_dict().items()}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            got = tuple(f.get_slice(key).get_shape())
            if key in expected and expected[key] != got:
                raise MerinoError(
                    f"{weights.parent}: weights do not match the architecture in config.json: "
                    f"{key} is {list(got)} in {weights.name} but {list(expected[key])} by config.json"
                )


def check_safetensors(path: Path) -> None:
    """A one-line ``MerinoError`` for a truncated file or a corrupt header (read without loading
    the tensors), before a library deep below turns it into a traceback."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - SafetensorError (not an OSError subclass), OSError
        raise MerinoError(f"{path}: truncated or corrupt safetensors file ({_first_line(e)})") from None


def _load_gptq_dir(path: Path) -> LoadedModel:
    from merino_pl.core.quant.format import load_quantized

    model, _ = load_quantized(path)
    config = model.config
    recipe = Recipe(config.recipe_name or path.name, config.arch, dict(config.provenance))
    return LoadedModel(model, recipe, "gptq", str(path), sha256_file(path / WEIGHTS_NAME))


def _load_lightning_ckpt(path: Path) -> LoadedModel:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / not a torch file
        raise MerinoError(f"{path}: cannot read checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    meta = ckpt.get("merino") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "recipe" not in meta:
        raise MerinoError(f"{path}: not a merino-pl checkpoint (no 'merino.recipe' entry)")
    recipe = Recipe.from_dict(meta["recipe"], source=f"{path}[merino.recipe]")
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model = MerinoForCausalLM.from_recipe(recipe)
    model.config.trained_seq_len = _seq_len(meta.get("seq_len"))  # travels into every export's config.json
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MerinoError(f"{path}: weights do not match its recipe {recipe.name!r}: {_first_line(e)}") from None
    return LoadedModel(model.eval(), recipe, "lightning-ckpt", str(path), sha256_file(path))


def _seq_len(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def trained_context(source: str | Path | LoadedModel) -> int | None:
    """The context (tokens) a model was trained at, as ``merino-pl fit`` recorded it: from a
    loaded model, a ``.ckpt`` (its ``merino.seq_len``, read without loading the weights) or a
    model / GPTQ directory (``config.json``'s ``trained_seq_len``). ``None`` when nothing is
    recorded (a recipe, or a file written before fit recorded it): callers then fall back to
    ``max_position_embeddings`` and say so (``context_window``)."""
    if isinstance(source, LoadedModel):
        return _seq_len(getattr(source.model.config, "trained_seq_len", None))
    path = Path(source)
    if path.is_dir():
        from merino_pl.core.io import read_json

        config = read_json(path / "config.json", "model config") if (path / "config.json").is_file() else {}
        return _seq_len(config.get("trained_seq_len") if isinstance(config, dict) else None)
    if path.suffix == ".ckpt" and path.is_file():
        try:  # mmap: the small "merino" entry only, not the weights
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - unreadable: the loader reports it in one line
            return None
        meta = ckpt.get("merino") if isinstance(ckpt, dict) else None
        return _seq_len(meta.get("seq_len")) if isinstance(meta, dict) else None
    return None


def trained_tokenizer(source: str | Path) -> str | None:
    """The tokenizer a model was trained with, for the stages that ship or read text with it:
    a model / GPTQ directory's own ``tokenizer.json``, or what ``merino-pl fit`` recorded in a
    ``.ckpt`` (``merino.tokenizer``: a shipped name or a path). ``None`` when nothing is recorded
    (trained with the default GPT-NeoX-20B, or a recipe)."""
    path = Path(source)
    if path.is_dir():
        return str(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
    if path.suffix == ".ckpt" and path.is_file():
        tokenizer = _ckpt_meta(path).get("tokenizer")
        return tokenizer if isinstance(tokenizer, str) and tokenizer else None
    return None


def _ckpt_meta(path: Path) -> dict:
    """A ``.ckpt``'s ``merino`` entry ({} when unreadable: the loader reports that in one line)."""
    try:  # mmap: the small "merino" entry only, not the weights
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001
        return {}
    meta = ckpt.get("merino") if isinstance(ckpt, dict) else None
    return meta if isinstance(meta, dict) else {}


def context_window(loaded: LoadedModel) -> tuple[int, str | None]:
    """The default scoring window of ``loaded``: its trained context, else (nothing recorded)
    ``max_position_embeddings`` with a note saying so, for the caller to print."""
    trained = trained_context(loaded)
    if trained is not None:
        return trained, None
    limit = loaded.model.config.max_position_embeddings
    return limit, (
        f"{loaded.path} records no trained context (a recipe, or written before merino-pl recorded it): "
        f"using max_position_embeddings {limit}"
    )


def export_pretrained(model: MerinoForCausalLM, out: str | Path, tokenizer: str | None = None) -> Path:
    """Write a self-contained HF directory (safetensors weights + ``save_model_files``), atomically.

    The directory is built beside ``out`` and renamed into place, so an interrupted export never
    leaves a half-written model where a user (or lm-eval) would load it. ``model.config`` gains
    the tokenizer's token ids and the ``auto_map`` (what the directory's config.json says).
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
        write_pretrained(model, tmp, tokenizer)
    return out


def write_pretrained(model: MerinoForCausalLM, folder: Path, tokenizer: str | None = None) -> None:
    """``export_pretrained``'s files written into ``folder`` as they are (not atomic by itself:
    for a caller that builds more files beside them and swaps the whole directory in at once)."""
    model.generation_config = save_model_files(folder, model.config, tokenizer)
    with _quiet_transformers():  # no "Writing model shards" bar for one small file
        model.save_pretrained(folder, safe_serialization=True)  # the weights (and the same two configs)


def save_model_files(out: Path, config: MerinoHFConfig, tokenizer: str | None) -> GenerationConfig:
    """Everything of a model directory but its weights, so that tools without merino-pl load it.

    Writes the tokenizer (its ``model_max_length`` the model's context), the remote code
    (``configuration_merino.py`` / ``modeling_merino.py``, see ``merino_pl.core.remote_code``), and
    ``config`` (completed in place with the tokenizer's bos / eos / pad ids and the ``auto_map`` to
    that code) as ``config.json`` + ``generation_config.json``; returns the generation config.
    """
    from merino_pl.core.remote_code import write_remote_code
    from merino_pl.core.tokenizer import hf_tokenizer

    tok = hf_tokenizer(tokenizer, model_max_length=config.max_position_embeddings)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    config.auto_map = write_remote_code(out)
    config.architectures = [MerinoForCausalLM.__name__]
    generation = GenerationConfig.from_model_config(config)
    config.save_pretrained(out)
    generation.save_pretrained(out)
    tok.save_pretrained(out)
    return generation


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" / "Writing model shards" bar from transformers (a load is a fraction
    of a second here, and a bar on stderr would precede a one-line error about the model)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
