"""lm-evaluation-harness backends for MeRino models.

(a) ``merino``: our own ``TemplateLM`` registered with ``@register_model("merino")``, over
    anything :func:`merino_pl.core.checkpoint.load_model` loads (``.ckpt``, exported directory,
    recipe, GPTQ directory); ``max_length`` defaults to the context the model was trained at::

        simple_evaluate(model=MerinoLM(loaded), tasks=[...])
        simple_evaluate(model="merino", model_args="pretrained=runs/demo/checkpoints/last.ckpt")

(b) ``hf``: lm-eval's stock ``HFLM`` on an exported directory. ``transformers`` finds the
    ``merino`` model type only after ``merino_pl.core.hf`` is imported (this module does so);
    :func:`hf_lm` builds HFLM from the loaded instance, and
    ``python -m merino_pl.eval.harness ARGS`` is the stock ``lm_eval`` command line with
    that import done first (see docs/eval.md).

Both compute the same numbers (a test checks every log-likelihood to 1e-4).
"""

from __future__ import annotations

import sys
from typing import Any

import lm_eval.models  # noqa: F401  (before registering: lm-eval fills its built-in registry
import torch  # lazily only while the registry is empty, so "hf" would vanish otherwise)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from merino_pl.core.checkpoint import LoadedModel, context_window, load_model
from merino_pl.core.tokenizer import EOS_TOKEN, hf_tokenizer, load_tokenizer, model_tokenizer
from merino_pl.eval.scoring import score


def tokenizer_source(loaded: LoadedModel) -> str | None:
    """The tokenizer the model was trained with (``model_tokenizer``: an exported directory's own,
    the one a ``.ckpt`` recorded, an error when that is missing); None (the default) for a recipe,
    a freshly initialised model."""
    return None if loaded.kind == "recipe" else model_tokenizer(loaded.path)


@register_model("merino")
class MerinoLM(TemplateLM):
    """A MeRino model for lm-eval: loglikelihood, loglikelihood_rolling and generate_until."""

    def __init__(
        self,
        pretrained: str | LoadedModel,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        device: str | None = None,
        tokenizer: str | None = None,
        **_: Any,  # lm-eval passes max_batch_size etc. to every backend
    ) -> None:
        super().__init__()
        self.loaded = pretrained if isinstance(pretrained, LoadedModel) else load_model(pretrained)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.loaded.model.to(self._device).eval()
        self.tok = load_tokenizer(tokenizer or tokenizer_source(self.loaded))
        self._eot = self.tok.token_to_id(EOS_TOKEN)
        self.batch_size = 8 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        # the trained context (positions past it never received a gradient), else max_position_embeddings
        self.max_length = int(max_length or context_window(self.loaded)[0])

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return "gpt-neox-20b"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=False)

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results = score(
            self.model,
            [(ctx, cont) for _, ctx, cont in requests],
            batch_size=self.batch_size,
            max_length=self.max_length,
            pad_id=self._eot,
            progress=None if disable_tqdm else "loglikelihood",
        )
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Document log-likelihood over disjoint windows of the full context (lm-eval's rule)."""
        windows: list[tuple[int, list[int], list[int]]] = []
        for doc, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((doc, ctx, cont))
        scored = self._loglikelihood_tokens([(None, ctx, cont) for _, ctx, cont in windows], disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for (doc, _, _), (logprob, _) in zip(windows, scored):
            totals[doc] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding with the KV cache, cut at the first stop string of each request."""
        outputs = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or [self.tok_decode([self._eot])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kwargs.pop("max_gen_toks", 256)), self.max_length - 1)
            ids = self.tok_encode(context)[-(self.max_length - max_new) :] or [self._eot]
            text = self._greedy(ids, max_new, until)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    @torch.no_grad()
    def _greedy(self, ids: list[int], max_new: int, until: list[str]) -> str:
        out = self.model.generate(
            torch.tensor([ids], device=self._device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self._device),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=self._eot,
            pad_token_id=self._eot,
        )
        text = self.tok_decode(out[0, len(ids) :].tolist())
        for stop in until:
            text = text.split(stop)[0]
        return text


def hf_lm(loaded: LoadedModel, batch_size: int = 8, device: str | None = None, max_length: int | None = None):
    """lm-eval's stock ``HFLM`` over the loaded instance (path (b): the ``hf`` backend);
    ``max_length`` defaults to the trained context (HFLM's own would be max_position_embeddings)."""
    from lm_eval.models.huggingface import HFLM

    from merino_pl.core.checkpoint import context_window

    tok = hf_tokenizer(tokenizer_source(loaded))
    return HFLM(
        pretrained=loaded.model,
        tokenizer=tok,
        batch_size=batch_size,
        device=device or "cpu",
        max_length=max_length or context_window(loaded)[0],
    )


def main(argv: list[str] | None = None) -> int:
    """The stock ``lm_eval`` CLI with ``merino_pl`` imported: ``--model hf`` finds the merino
    model type and ``--model merino`` is registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
