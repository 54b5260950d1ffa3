"""The packed torch path: ``QuantLinear``'s unpacking and dequantization against the reference
unpacking of the GPTQ layout (``packing``), and the int8 head against its float table."""

from __future__ import annotations

import pytest
import torch

from merino_pl.core.quant.packing import dequantize, pack, unpack_rows
from merino_pl.core.quant.qembedding import HEAD_ROWS, QuantEmbedding
from merino_pl.core.quant.qlinear import QuantLinear, Workspace
from merino_pl.core.quant.rtn import QuantizedWeight, num_groups


def _layer(
    k: int, n: int, bits: int, group: int, act_order: bool = False, seed: int = 0, sym: bool = False
) -> QuantLinear:
    """A QuantLinear over random codes / scales / zeros (all of the grid; ``sym``: every zero
    the grid's middle, GPTQ's default, which dequantizes by its own path)."""
    g = torch.Generator().manual_seed(seed)
    groups = num_groups(k, group)
    size = k if group == -1 else group
    g_idx = torch.arange(k) // size
    if act_order:  # GPTQ's desc_act: the same groups, columns in a scattered order
        g_idx = g_idx[torch.randperm(k, generator=g)]
    q = QuantizedWeight(
        codes=torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32),
        scales=(torch.rand(groups, n, generator=g) * 0.01 + 1e-3).half().float(),
        zeros=torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32)
        if sym
        else torch.randint(1, 2**bits, (groups, n), generator=g, dtype=torch.int32),
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=group,
    )
    lin = QuantLinear(k, n, bits, group, bias=True)
    lin.load_state_dict({**pack(q), "bias": torch.randn(n, generator=g)})
    return lin


CASES = [  # (in, out, bits, group, act_order): per channel, whole groups, a shorter last group, act-order
    (64, 48, 4, -1, False),
    (64, 48, 8, -1, False),
    (64, 32, 4, 16, False),
    (64, 32, 8, 16, False),
    (40, 24, 4, 16, False),
    (40, 24, 8, 16, False),
    (64, 32, 4, 16, True),
    (48, 16, 8, 32, True),
]


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("k,n,bits,group,act_order", CASES)
def test_dequantized_equals_the_reference_unpacking(k, n, bits, group, act_order, sym):
    lin = _layer(k, n, bits, group, act_order, sym=sym)
    assert lin._is_symmetric() == sym
    ref = dequantize(lin.qweight, lin.qzeros, lin.scales, lin.g_idx, bits)  # (out, in), original order
    assert torch.equal(lin.codes(), unpack_rows(lin.qweight, bits).to(torch.uint8))
    perm, _ = lin._row_order()
    assert (perm is not None) == act_order
    w = lin.dequantized()
    torch.testing.assert_close(w, ref if perm is None else ref[:, perm], rtol=0, atol=0)
    x = torch.randn(3, 5, k)
    torch.testing.assert_close(lin(x), x @ ref.t() + lin.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits,act_order", [(4, False), (8, False), (4, True), (8, True)])
def test_dequantization_writes_into_the_given_workspace(bits, act_order, sym):
    """The reused buffers are written, not fresh tensors; the same result as a fresh dequantization."""
    lin = _layer(64, 32, bits, 16, act_order, seed=1, sym=sym)
    ws = Workspace(64 * 32 + 7, lin.scratch_bytes())
    w = lin.dequantized(out=ws.floats, scratch=ws.bytes)
    assert w.data_ptr() == ws.floats.data_ptr() and w.shape == (32, 64)
    assert torch.equal(w, lin.dequantized())
    ws.floats.fill_(float("nan"))  # stale scratch must not leak into the next call
    ws.bytes.fill_(255)
    assert torch.equal(lin.dequantized(out=ws.floats, scratch=ws.bytes), lin.dequantized())


@pytest.mark.parametrize("bits", [4, 8])
def test_resident_words_are_transposed_and_the_state_dict_is_the_files(bits, tmp_path):
    """Loaded (copied or assigned), ``qweight`` is held with each output row's words contiguous;
    ``state_dict`` and safetensors give back GPTQ's contiguous (in // k, out) tensor, unchanged,
    and a module given that layout directly still dequantizes the same."""
    from safetensors.torch import load_file, save_model

    ref = _layer(48, 24, bits, 16, sym=True)
    packed = {k: v.clone() for k, v in ref.state_dict().items()}
    assert packed["qweight"].is_contiguous() and packed["qweight"].shape == (48 * bits // 32, 24)
    for assign in (False, True):
        lin = QuantLinear(48, 24, bits, 16, bias=True)
        lin.load_state_dict({k: v.clone() for k, v in packed.items()}, assign=assign)
        assert lin.qweight.shape == packed["qweight"].shape and lin.qweight.t().is_contiguous()
        assert torch.equal(lin.qweight, packed["qweight"])
        assert torch.equal(lin.dequantized(), ref.dequantized())
        save_model(lin, str(tmp_path / "w.safetensors"))
        assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["qweight"], packed["qweight"])
    lin.qweight = packed["qweight"].clone()  # the GPTQ layout itself: transposed per call instead
    assert torch.equal(lin.dequantized(), ref.dequantized())


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("workspace", [False, True])
def test_int8_head_equals_the_float_table(tokens, workspace):
    """Chunked head (a vocabulary that is not a multiple of the chunk) == hidden @ (codes · scales)ᵀ."""
    torch.manual_seed(0)
    vocab, d = HEAD_ROWS * 2 + 37, 24
    emb = QuantEmbedding.from_float(torch.nn.Embedding(vocab, d))
    if workspace:
        emb.workspace = Workspace(HEAD_ROWS * d, 1)
    h = torch.randn(2, tokens, d)
    logits = emb.lm_head(h)
    assert logits.shape == (2, tokens, vocab)
    torch.testing.assert_close(logits, h @ emb.weight.t(), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[0, vocab - 1, HEAD_ROWS]])
    torch.testing.assert_close(emb(ids), emb.weight[ids], rtol=0, atol=0)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("k,n,group,act_order", [(64, 32, 32, False), (128, 32, 64, True), (256, 16, 128, False)])
def test_int4_kernel_tensors_reproduce_the_dequantized_layer(k, n, group, act_order, sym):
    """torch's int4 kernel (CUDA's ``_weight_int4pack_mm``; here its CPU variant, which takes the
    same scales-and-zeros tensor) over the converted GPTQ tensors == the dequantizing path."""
    from merino_pl.core.quant import tinygemm

    lin = _layer(k, n, 4, group, act_order, sym=sym)
    kernel = lin.int4_kernel()
    assert kernel is not None and lin.int4_kernel() is kernel  # built once per device
    assert "int4_packed" not in lin.state_dict()  # the file's tensors only
    x = torch.randn(3, 5, k)
    perm, _ = lin._row_order()
    xg = x if perm is None else x.index_select(-1, perm)
    torch.testing.assert_close(tinygemm.matmul(xg, kernel) + lin.bias, lin(x), rtol=1e-4, atol=1e-4)


def test_int4_kernel_is_not_used_where_it_does_not_fit_or_disagrees():
    from merino_pl.core.quant import tinygemm

    assert _layer(96, 16, 4, 64).int4_kernel() is None  # a shorter last group
    assert _layer(64, 16, 8, 32).int4_kernel() is None  # 8 bits
    assert _layer(64, 24, 4, 32).int4_kernel() is None  # outputs not a multiple of 16
    lin = _layer(64, 16, 4, 32, seed=3)
    wrong = tinygemm.build(lin._codes_nk(None), lin.scales, lin.zeros_float() + 1, 32)
    with pytest.warns(UserWarning, match="keeps the dequantizing path"):
        assert tinygemm.checked(wrong, lin.dequantized(), "layer") is None
    odd = _layer(64, 24, 4, 32)  # a kernel that raises (here: N not a multiple of 16) is the same fallback
    with pytest.warns(UserWarning, match="not available here"):
        codes, zeros = odd._codes_nk(None), odd.zeros_float()
        assert tinygemm.build_checked(codes, odd.scales, zeros, 32, odd.dequantized(), "x") is None
