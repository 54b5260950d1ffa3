from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import merino_pl  # noqa: F401  (registers the model type)
from conftest import tiny_arch
from merino_pl.core.checkpoint import export_pretrained, load_model
from merino_pl.core.costs import count_params
from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.model import lm_loss


@pytest.fixture
def model() -> MerinoForCausalLM:
    torch.manual_seed(0)
    return MerinoForCausalLM.from_arch(tiny_arch()).eval()


def test_param_count_matches_cost_model(model: MerinoForCausalLM) -> None:
    assert sum(p.numel() for p in model.parameters()) == count_params(model.arch)


def test_param_count_matches_cost_model_with_rmsnorm() -> None:
    arch = tiny_arch(norm="rmsnorm")
    model = MerinoForCausalLM.from_arch(arch)
    assert sum(p.numel() for p in model.parameters()) == count_params(arch)


def test_weight_sharing_really_shares_storage(model: MerinoForCausalLM) -> None:
    arch = model.arch
    # one layer per block, whatever its depth
    layers = [m for m in model.modules() if type(m).__name__ == "DecoderLayer"]
    assert len(layers) == arch.num_blocks < arch.num_layer_applications
    # every application of block j runs the same tensors: record the q_proj weight pointer per call
    seen: dict[int, set[int]] = {}
    hooks = [
        b.layer.attn.q_proj.register_forward_hook(
            lambda m, i, o, j=j: seen.setdefault(j, set()).add(m.weight.data_ptr())
        )
        for j, b in enumerate(model.model.blocks)
    ]
    calls: list[int] = []
    counters = [
        b.layer.register_forward_hook(lambda m, i, o, j=j: calls.append(j)) for j, b in enumerate(model.model.blocks)
    ]
    model(torch.randint(0, 512, (1, 8)))
    for h in hooks + counters:
        h.remove()
    assert [calls.count(j) for j in range(arch.num_blocks)] == [b.num_layers for b in arch.blocks]
    assert all(len(ptrs) == 1 for ptrs in seen.values())
    assert len({next(iter(p)) for p in seen.values()}) == arch.num_blocks


def test_kv_cache_decoding_matches_full_forward(model: MerinoForCausalLM) -> None:
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        out = model(x[:, :10], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(10, 24):
            out = model(x[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
        # a multi-token chunk on top of a cache uses the offset causal mask; the cache's older
        # keyword, past_key_values, is accepted too
        chunk = model(x[:, :20], use_cache=True)
        tail = model(x[:, 20:], past_key_values=chunk.cache, use_cache=True).logits
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    assert (tail - full[:, 20:]).abs().max() < 1e-5
    assert cache.get_seq_length() == 24


def test_generate_uses_the_cache_and_prints_no_deprecation(model: MerinoForCausalLM, capfd) -> None:
    """Greedy generate (which passes transformers' cache back each step) equals re-running the
    whole sequence each step, and neither logs transformers' `past_key_values` deprecation."""
    x = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        gen = model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)
        ids = x
        for _ in range(8):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, ids)
    assert "deprecat" not in capfd.readouterr().err.lower()


def test_left_padding_does_not_change_logits(model: MerinoForCausalLM) -> None:
    x = torch.randint(0, 512, (1, 12))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = model(x).logits
        got = model(padded, attention_mask=mask).logits[:, 4:]
    assert (ref - got).abs().max() < 1e-5


def test_logits_to_keep_and_loss(model: MerinoForCausalLM) -> None:
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        full = model(x, labels=x)
        last = model(x, logits_to_keep=1).logits
    assert last.shape == (2, 1, 512) and torch.allclose(last[:, 0], full.logits[:, -1], atol=1e-6)
    assert 5.5 < full.loss.item() < 7.0  # ~ln(512) at init


def test_save_then_automodel_gives_identical_logits_and_generates(model: MerinoForCausalLM, tmp_path: Path) -> None:
    out = export_pretrained(model, tmp_path / "exported")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    again = AutoModelForCausalLM.from_pretrained(out)
    assert type(again) is MerinoForCausalLM
    x = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
        gen = again.generate(x[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 11)
    loaded = load_model(out)
    assert loaded.kind == "hf-dir" and loaded.weights_sha256 and loaded.recipe.architecture == model.arch


def test_init_is_standard(model: MerinoForCausalLM) -> None:
    w = model.model.blocks[2].layer.ffn.up.weight
    assert abs(w.std().item() - 0.02) < 0.003 and model.model.blocks[0].layer.attn.q_proj.bias.abs().max() == 0


def test_import_merino_pl_after_transformers_registers_the_model_type() -> None:
    """Scripts import transformers first (isort order); `import merino_pl` then registers."""
    code = "from transformers import AutoConfig; import merino_pl; print(type(AutoConfig.for_model('merino')).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "MerinoHFConfig"


def test_one_loss_serves_training_eval_and_labels(model: MerinoForCausalLM) -> None:
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        out = model(x, labels=x)
    logits, targets = out.logits[:, :-1], x[:, 1:]  # position t scores token t + 1
    assert torch.equal(lm_loss(logits, targets), out.loss)
    per_token = lm_loss(logits, targets, reduction="none")  # eval's need: each token's NLL
    assert per_token.shape == (2, 15)
    assert torch.allclose(per_token.mean(), out.loss)
    assert torch.allclose(per_token.sum(), lm_loss(logits, targets, reduction="sum"))


def test_config_parses_the_architecture_once_and_saves_no_cache(model: MerinoForCausalLM) -> None:
    config = model.config
    assert config.arch is config.arch and config.arch == model.arch
    assert "_arch_parsed" not in config.to_dict() and "_arch_parsed" not in config.to_json_string()
    config.architecture = dict(config.architecture, norm="rmsnorm")  # a changed architecture is parsed again
    assert config.arch.norm == "rmsnorm"
    config.architecture["norm"] = "layernorm"
    assert config.arch == model.arch


def test_forward_arguments_work_or_are_refused(model: MerinoForCausalLM) -> None:
    x = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        logits, cache = model(x, return_dict=False)
        assert torch.equal(logits, model(x).logits) and cache.get_seq_length() == 6
        with pytest.raises(ValueError, match="output_attentions=True"):
            model(x, output_attentions=True)
        with pytest.raises(TypeError, match="inputs_embeds"):
            model(x, inputs_embeds=torch.zeros(1, 6, 96))
