"""StaticDecoder: its step-by-step logits and greedy tokens are the HF model's full-sequence ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.generate import DecodeError, StaticDecoder
from lowbit.kv.spec import KVCacheSpec
from tests.conftest import FAMILIES, tiny_family, tiny_llama


def test_static_decoder_matches_the_full_forward_and_greedy_continuation():
    model = tiny_llama(seed=2, tie=False)
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(0))
    decoder = StaticDecoder(model, batch=3, max_len=16)
    decoder.prefill(prompt)
    with torch.no_grad():
        full = model(prompt).logits[:, -1].float()
    torch.testing.assert_close(decoder.logits, full, rtol=1e-4, atol=1e-4)
    tokens = decoder.decode(5)
    # Greedy by definition: each new token is the argmax of the full forward over everything before it.
    sequence = prompt
    for t in range(5):
        with torch.no_grad():
            expected = model(sequence).logits[:, -1].argmax(dim=-1)
        assert torch.equal(tokens[:, t], expected)
        sequence = torch.cat([sequence, expected[:, None]], dim=1)
    assert int(decoder.pos) == 12


@pytest.mark.parametrize("prefill_tokens", [2, 6, 2048])
def test_prefill_in_chunks_fills_the_cache_as_one_position_a_step(monkeypatch, prefill_tokens):
    """The prompt read in chunks of one, three and all of its positions but the last, which the
    step reads (batch 2): the same cache, logits and greedy continuation as steps of one position
    each."""
    import lowbit.generate as generate

    model = tiny_llama(seed=7, tie=False)
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    by_steps = StaticDecoder(model, batch=2, max_len=16)
    for t in range(prompt.shape[1]):
        by_steps.ids.copy_(prompt[:, t : t + 1])
        by_steps.step()
    monkeypatch.setattr(generate, "PREFILL_TOKENS", prefill_tokens)
    chunked = StaticDecoder(model, batch=2, max_len=16)
    chunked.prefill(prompt)
    assert int(chunked.pos) == int(by_steps.pos) == 9
    for mine, theirs in zip(chunked.keys + chunked.values, by_steps.keys + by_steps.values):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.logits, by_steps.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(chunked.decode(4), by_steps.decode(4))


def test_static_decoder_refuses_what_does_not_fit():
    model = tiny_llama(seed=2, tie=False)
    decoder = StaticDecoder(model, batch=2, max_len=8)
    with pytest.raises(DecodeError, match="does not fit"):
        decoder.prefill(torch.zeros(3, 4, dtype=torch.long))
    decoder.prefill(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(DecodeError, match="exceed max_len"):
        decoder.decode(5)
    with pytest.raises(DecodeError, match="not a Llama-style"):
        StaticDecoder(nn.Linear(2, 2), batch=1, max_len=4)
    with pytest.raises(DecodeError, match="CUDA"):
        decoder.capture()


def _quantized_copy(model: nn.Module, fmt) -> nn.Module:
    """`model` with every decoder linear swapped for a QuantLinear of its `fmt` rounding."""
    from lowbit.formats.base import quantize_matrix
    from lowbit.modules import replace_linears

    names = [name for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    quantized = {f"model.layers.{name}": quantize_matrix(fmt, model.model.layers.get_submodule(name).weight.float())
                 for name in names}
    return replace_linears(model, quantized)


@pytest.mark.parametrize("kind", ["linear", "int4-sym", "int4-asym"])
def test_merged_projections_give_the_same_logits_and_tokens(kind):
    """q/k/v and gate/up run as one matmul each: same logits (float32 sums in another order) and
    the same greedy tokens, for float and int4 layers."""
    from lowbit.formats.integer import IntegerFormat

    model = tiny_llama(seed=3, tie=False)
    if kind != "linear":
        model = _quantized_copy(model, IntegerFormat(4, symmetric=kind == "int4-sym", group_size=32))
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    plain, merged = (StaticDecoder(model, batch=2, max_len=16, merge_projections=m) for m in (False, True))
    assert all(qkv is not None and gate_up is not None for qkv, gate_up in merged._merged)
    for decoder in (plain, merged):
        decoder.prefill(prompt)
    torch.testing.assert_close(merged.logits, plain.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.decode(4), plain.decode(4))


@pytest.mark.parametrize("kind", ["linear", "int4-asym"])
def test_merged_linears_keep_their_outputs_as_views_of_the_merged_weights(kind):
    """Merging costs no memory: each linear reads its slice of the merged module's tensors, and
    still computes what it did."""
    from lowbit.formats.integer import IntegerFormat
    from lowbit.modules.merge import merge_linears

    model = tiny_llama(seed=4, tie=False)
    if kind != "linear":
        model = _quantized_copy(model, IntegerFormat(4, symmetric=False, group_size=32))
    attn = model.model.layers[0].self_attn
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(3, parts[0].in_features, generator=torch.Generator().manual_seed(5))
    before = [part(x) for part in parts]
    merged = merge_linears(parts)
    torch.testing.assert_close(merged(x), torch.cat(before, dim=-1), rtol=1e-5, atol=1e-5)
    owners = [merged.weight] if kind == "linear" else [merged.qweight, merged.scales, merged.zeros]
    for part, expected in zip(parts, before):
        torch.testing.assert_close(part(x), expected, rtol=0, atol=0)
        held = [part.weight] if kind == "linear" else [part.qweight, part.scales, part.zeros]
        assert [t.untyped_storage().data_ptr() for t in held] == [t.untyped_storage().data_ptr() for t in owners]


def test_the_decoder_leaves_projections_with_quantized_inputs_separate():
    """An input quantizer is a forward pre-hook (W8A8 exports load so): a merged matmul would
    skip it, so q/k/v and gate/up stay separate, and the default decoder rounds as the model does."""
    from lowbit.formats.activation import ActivationFormat
    from lowbit.modules.input_quant import quantize_inputs

    model = tiny_llama(seed=6, tie=False)
    for layer in model.model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                       layer.mlp.gate_proj, layer.mlp.up_proj):
            quantize_inputs(linear, ActivationFormat(bits=4))
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    decoder = StaticDecoder(model, batch=1, max_len=8, fuse=False)
    assert all(qkv is None and gate_up is None for qkv, gate_up in decoder._merged)
    decoder.prefill(prompt)
    expected = model(prompt).logits[:, -1].float()
    torch.testing.assert_close(decoder.logits, expected, rtol=1e-4, atol=1e-4)


def test_merge_linears_refuses_what_cannot_share_one_matmul():
    from lowbit.formats.integer import IntegerFormat
    from lowbit.modules.merge import merge_linears
    from lowbit.modules.quant_linear import QuantLinear
    from tests.test_kernels import act_order_quantized, quantized

    assert merge_linears([nn.Linear(8, 4), nn.Linear(16, 4)]) is None  # different inputs
    assert merge_linears([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)]) is None
    hooked = nn.Linear(8, 4)
    hooked.register_forward_pre_hook(lambda module, args: (args[0].round(),))  # as an input quantizer is
    assert merge_linears([nn.Linear(8, 4), hooked]) is None
    fmt = IntegerFormat(4, symmetric=False, group_size=32)
    q = QuantLinear.from_quantized(quantized(16, 64, fmt))
    assert merge_linears([nn.Linear(64, 16), q]) is None  # a float and an int4 layer
    assert merge_linears([q, QuantLinear.from_quantized(quantized(16, 64, IntegerFormat(4, group_size=64)))]) is None
    plain_order = QuantLinear.from_quantized(quantized(16, 256, IntegerFormat(4, symmetric=False, group_size=128)))
    act_order = QuantLinear.from_quantized(act_order_quantized(16, 256, seed=1))  # its own gather of x
    assert merge_linears([plain_order, plain_order]) is not None
    assert merge_linears([plain_order, act_order]) is None
    merged = merge_linears([q, QuantLinear.from_quantized(quantized(8, 64, fmt, seed=1))])
    x = torch.randn(3, 64)
    assert merged.out_features == 24 and torch.allclose(merged(x)[:, :16], q(x), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge", [False, True])
def test_fused_step_is_the_module_step_bit_for_bit_off_gpu(dtype, merge):
    """Off CUDA, decode_ops runs the modules' own torch arithmetic: the fused step (adds fused with
    the next norm, the rotary products and cache writes in one call) gives the same bits."""
    model = tiny_llama(seed=4, tie=False).to(dtype)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    fused, modules = (StaticDecoder(model, batch=2, max_len=12, merge_projections=merge, fuse=f) for f in (True, False))
    assert fused.fused and not modules.fused
    for decoder in (fused, modules):
        decoder.prefill(prompt)
    assert torch.equal(fused.logits, modules.logits)
    assert all(torch.equal(a, b) for a, b in zip(fused.keys + fused.values, modules.keys + modules.values))
    assert torch.equal(fused.decode(4), modules.decode(4))


def test_models_whose_norms_decode_ops_does_not_reproduce_run_through_their_modules():
    class ScaledNorm(nn.Module):  # not LlamaRMSNorm's arithmetic
        def __init__(self, size: int) -> None:
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.ones(size)), 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x * self.weight

    model = tiny_llama(seed=5, tie=False)
    model.model.norm = ScaledNorm(64)
    decoder = StaticDecoder(model, batch=1, max_len=8)
    assert not decoder.fused
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(3))
    decoder.prefill(prompt)
    with torch.no_grad():
        torch.testing.assert_close(decoder.logits, model(prompt).logits[:, -1].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_style_families_decode_fused_as_their_full_forward(family):
    """Qwen2 (biased q/k/v), Mistral and Qwen3 (per-head q and k norms) share Llama's norm
    arithmetic: fused, and equal to the full forward, after the prompt and after each new token."""
    model = tiny_family(family, seed=7)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(4))
    fused, modules = (StaticDecoder(model, batch=2, max_len=12, fuse=f) for f in (True, False))
    assert fused.fused
    for decoder in (fused, modules):
        decoder.prefill(prompt)
    assert torch.equal(fused.logits, modules.logits)
    sequence = prompt
    for _ in range(3):
        with torch.no_grad():
            full = model(sequence).logits[:, -1].float()
        torch.testing.assert_close(fused.logits, full, rtol=1e-4, atol=1e-4)
        tokens = fused.decode(1)
        assert torch.equal(tokens, modules.decode(1)) and torch.equal(tokens[:, 0], full.argmax(dim=-1))
        assert torch.equal(fused.logits, modules.logits)
        sequence = torch.cat([sequence, tokens], dim=1)


def test_a_cache_longer_than_the_sliding_window_is_refused():
    model = tiny_family("mistral", seed=7)
    model.config.sliding_window = 8
    with pytest.raises(DecodeError, match="sliding window of 8"):
        StaticDecoder(model, batch=1, max_len=16)
    assert StaticDecoder(model, batch=1, max_len=8).max_len == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("batch", [1, 4])
def test_a_quantized_decoder_whose_products_stay_pending_gives_the_module_steps_logits(batch, family):
    """int4 layers of Gluon-sized shapes (N a multiple of 256), merged: the captured fused step, whose
    matmuls leave their sums pending for decode_ops to finish, against the modules' step (bf16
    logits within a few of bf16's units, as the fused decoder's own test allows), after the prompt
    (chunks, then its last position through the step) and after each new token. Qwen3's q/k/v
    product is finished for its per-head norms; the others stay pending."""
    from lowbit.formats.integer import IntegerFormat
    from lowbit.kernels import w4a16, w4a16_gluon

    model = tiny_family(family, seed=5, hidden_size=256, intermediate_size=512, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=128)
    model = _quantized_copy(model, IntegerFormat(4, symmetric=False, group_size=128)).to("cuda", torch.bfloat16)
    prompt = torch.randint(0, 256, (batch, 6), generator=torch.Generator().manual_seed(1)).cuda()
    fused, modules = (StaticDecoder(model, batch=batch, max_len=16, fuse=f) for f in (True, False))
    for decoder in (fused, modules):
        decoder.capture()
        decoder.prefill(prompt)
    for _ in range(3):
        torch.testing.assert_close(fused.logits, modules.logits, rtol=5e-2, atol=5e-2)
        modules.ids.copy_(fused.ids)  # the same next token for both, whatever a near tie chose
        fused.decode(1)
        modules.decode(1)
    if w4a16_gluon.available():
        assert any(key[1] == batch for key in w4a16._PENDING), "no product was left pending"
    assert all(not buffer.any() for buffer in w4a16._PENDING.values())  # each read back to zero


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("kind", ["int8-token", "fp8"])
def test_a_coded_cache_decodes_as_lowbit_eval_scores_it(fuse, kind):
    """Read one position a step, the coded decoder's logits are those of `lowbit eval --kv-cache KIND`
    token by token (chunks of one); the prompt read in one chunk, those of the eval's chunk of the
    same positions (they attend to each other exactly). Fused and module steps alike."""
    import lowbit.generate as generate
    from lowbit.evaluate.kv_protocol import CacheScoring
    from lowbit.kv.spec import spec_of_name

    model = tiny_llama(seed=4, tie=False)
    spec = spec_of_name(kind)
    prompt = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(2))
    by_tokens = CacheScoring(spec, chunk=1).logits(model, prompt)
    exact = CacheScoring(None, chunk=1).logits(model, prompt)
    assert (by_tokens[-1] - exact[-1]).abs().max() > 1e-4  # the codes change what later tokens read
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generate, "PREFILL_TOKENS", 1)
        decoder = StaticDecoder(model, batch=1, max_len=16, kv_cache=spec, fuse=fuse)
        decoder.prefill(prompt)
    assert decoder.fused == fuse
    torch.testing.assert_close(decoder.logits[0], by_tokens[-1].float(), rtol=1e-5, atol=1e-5)
    chunked = StaticDecoder(model, batch=1, max_len=16, kv_cache=spec, fuse=fuse)
    chunked.prefill(prompt)
    by_chunk = CacheScoring(spec, chunk=10).logits(model, prompt)
    torch.testing.assert_close(chunked.logits[0], by_chunk[-1].float(), rtol=1e-5, atol=1e-5)
    # Greedy: each new token the argmax of the eval's token-by-token logits over the sequence so far.
    tokens, sequence = decoder.decode(4), prompt
    for t in range(4):
        expected = CacheScoring(spec, chunk=1).logits(model, sequence)[-1].argmax()
        assert int(tokens[0, t]) == int(expected)
        sequence = torch.cat([sequence, expected.view(1, 1)], dim=1)


@pytest.mark.parametrize("kind", ["int8-token", "fp8"])
def test_coded_fused_step_is_the_module_step_bit_for_bit_off_gpu(kind):
    model = tiny_llama(seed=5, tie=False)
    spec = KVCacheSpec(kind=kind)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(4))
    fused, modules = (StaticDecoder(model, batch=2, max_len=12, kv_cache=spec, fuse=f) for f in (True, False))
    for decoder in (fused, modules):
        decoder.prefill(prompt)
    assert torch.equal(fused.logits, modules.logits)
    assert torch.equal(fused.decode(5), modules.decode(5))
    for mine, theirs in zip(fused.keys + fused.values, modules.keys + modules.values):
        assert torch.equal(mine.codes.view(torch.uint8), theirs.codes.view(torch.uint8))
        assert torch.equal(mine.scales, theirs.scales) and torch.equal(mine.latest, theirs.latest)


def test_a_coded_cache_read_whole_by_the_masked_sdpa_gives_the_same_logits():
    """prefix_attention=False reads the whole coded cache dequantized (its own position exact) under
    the mask: the logits of the default step."""
    model = tiny_llama(seed=3, tie=False)
    spec = KVCacheSpec(kind="int8-token")
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(6))
    masked, prefix = (StaticDecoder(model, batch=2, max_len=10, kv_cache=spec, prefix_attention=p)
                      for p in (False, True))
    for decoder in (masked, prefix):
        decoder.prefill(prompt)
    torch.testing.assert_close(masked.logits, prefix.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(masked.decode(4), prefix.decode(4))


def test_a_coded_cache_holds_a_byte_a_number_and_a_scale_a_row():
    """cache_bytes: bf16 entries at 2 bytes a number; a coded cache 1 byte a number, a float32
    scale per position and head, and each layer's latest entries in bf16."""
    model = tiny_llama(seed=3, tie=False).to(torch.bfloat16)
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    dim = model.config.hidden_size // model.config.num_attention_heads
    plain = StaticDecoder(model, batch=2, max_len=10)
    coded = StaticDecoder(model, batch=2, max_len=10, kv_cache=KVCacheSpec(kind="int8-token"))
    rows = 2 * layers * 2 * kv_heads  # keys and values, layers, batch, kv heads
    assert plain.cache_bytes() == rows * 10 * dim * 2
    assert coded.cache_bytes() == rows * (10 * (dim + 4) + dim * 2)


def test_the_decoder_refuses_an_integer_kv_cache():
    with pytest.raises(DecodeError, match="int8-token or fp8 KV cache or none"):
        StaticDecoder(tiny_llama(seed=2), batch=1, max_len=8, kv_cache=KVCacheSpec(bits=4))
