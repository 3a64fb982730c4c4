"""The quantized KV cache against slow, obvious references, on random tensors and a tiny random Llama."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

from lowbit.kv import KVCacheSpec, QuantizedKVCache
from lowbit.kv.layer import QuantizedKVLayer
from lowbit.kv.memory import AttentionShape, bytes_per_token, cache_bytes
from lowbit.kv.packing import PackingError, pack_codes, unpack_codes
from lowbit.kv.quantizer import dequantize_per_channel, quantize_groups, quantize_per_channel
from lowbit.kv.rope import KeyRotation
from lowbit.models.cache_argument import cache_argument, with_cache


def random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def slow_round_trip(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Group by group along the last axis, with the float16 scale and minimum the cache stores."""
    out = torch.empty(x.shape)
    flat, result = x.reshape(-1, x.shape[-1]).float(), out.view(-1, x.shape[-1])
    for row in range(flat.shape[0]):
        for begin in range(0, flat.shape[1], group_size):
            group = flat[row, begin : begin + group_size]
            minimum = group.min().half().float()
            scale = ((group.max() - group.min()) / (2**bits - 1)).half().float().clamp(min=2**-14)
            codes = torch.clamp(torch.round((group - minimum) / scale), 0, 2**bits - 1)
            result[row, begin : begin + group_size] = codes * scale + minimum
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_pack_into_bits_per_entry_and_unpack_exactly(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 32), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 32 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_packing_refuses_lengths_that_do_not_fill_bytes():
    with pytest.raises(PackingError, match="multiple of 4"):
        pack_codes(torch.zeros(6, dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits,group_size", [(8, 16), (4, 8), (2, 32)])
def test_group_round_trip_equals_slow_reference(bits, group_size):
    x = random(2, 3, 64) * 3 + 1
    got = quantize_groups(x, bits, group_size).dequantize()
    assert torch.allclose(got, slow_round_trip(x, bits, group_size), atol=1e-6)
    error = (got - x).abs().max()
    assert error <= (x.max() - x.min()) / (2**bits - 1)  # at most one step of the widest group
    assert error > 0


def test_keys_group_along_tokens_per_channel_and_values_along_channels_per_token():
    states = random(1, 2, 16, 8)  # [batch, heads, tokens, head_dim]
    states[..., 3] += 50.0  # an outlier channel, as keys have
    keys = quantize_per_channel(states, 4, group_size=8)
    assert keys.scale.shape == (1, 2, 8, 2)  # per channel, one group per 8 tokens
    reference = slow_round_trip(states.transpose(-1, -2), 4, 8).transpose(-1, -2)
    assert torch.allclose(dequantize_per_channel(keys, torch.float32), reference, atol=1e-6)
    # per channel, the outlier channel does not coarsen the others ...
    others = [c for c in range(8) if c != 3]
    key_error = (dequantize_per_channel(keys, torch.float32) - states)[..., others].abs().max()
    values = quantize_groups(states, 4, group_size=8)
    assert values.scale.shape == (1, 2, 16, 1)  # per token, one group of 8 channels
    value_error = (values.dequantize() - states)[..., others].abs().max()
    assert key_error < value_error / 5  # ... while a per-token group spans it
    # changing one token moves only its own value groups, but every key of its token group
    changed = states.clone()
    changed[..., 5, :] *= 3
    value_moved = (quantize_groups(changed, 4, 8).dequantize() != values.dequantize()).any(dim=-1)
    assert value_moved[..., 5].all() and not value_moved[..., [t for t in range(16) if t != 5]].any()
    key_moved = (dequantize_per_channel(quantize_per_channel(changed, 4, 8), torch.float32)
                 != dequantize_per_channel(keys, torch.float32)).any(dim=-1)
    assert key_moved[..., :8].any() and not key_moved[..., 8:].any()


@pytest.mark.parametrize("residual,group_size", [(0, 4), (6, 4), (5, 8)])
def test_window_keeps_last_tokens_exact_and_the_rest_quantized_as_a_whole(residual, group_size):
    spec = KVCacheSpec(bits=4, group_size=group_size, residual=residual)
    layer = QuantizedKVLayer(spec, head_dim=8)
    keys, values = random(1, 2, 41, 8, seed=1), random(1, 2, 41, 8, seed=2)
    fed = 0
    for step in (7, 1, 1, 13, 2, 1, 9, 1, 1, 1, 1, 1, 1):
        got_keys, got_values = layer.update(keys[..., fed : fed + step, :], values[..., fed : fed + step, :])
        fed += step
        assert layer.get_seq_length() == fed
        assert got_keys.shape[-2] == fed
        # the window of the cache before this step, and this step, come back exact ...
        exact_keys = layer.keys.shape[-2]
        exact_values = layer.values.shape[-2]
        assert exact_values == min(fed, residual)
        assert min(fed, residual) <= exact_keys < residual + group_size
        assert (fed - exact_keys) % group_size == 0
        # ... the rest is what quantizing the whole prefix at once gives (flush timing does not matter)
        old = fed - step
        stored_values = old - min(old, residual)
        stored_keys = (old - residual) // group_size * group_size if old > residual else 0
        assert torch.equal(got_values[..., stored_values:, :], values[..., stored_values:fed, :])
        assert torch.equal(got_keys[..., stored_keys:, :], keys[..., stored_keys:fed, :])
        if stored_values:
            expected = slow_round_trip(values[..., :stored_values, :], 4, min(group_size, 8))
            assert torch.allclose(got_values[..., :stored_values, :], expected, atol=1e-6)
        if stored_keys:
            expected = slow_round_trip(keys[..., :stored_keys, :].transpose(-1, -2), 4, group_size).transpose(-1, -2)
            assert torch.allclose(got_keys[..., :stored_keys, :], expected, atol=1e-6)


def greedy(model, ids: torch.Tensor, cache, tokens: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("pre_rope", [False, True])
def test_generation_at_8_bits_matches_the_full_precision_cache(tiny_model, pre_rope):
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    expected, expected_logits = greedy(tiny_model, ids, DynamicCache(config=tiny_model.config))
    cache = QuantizedKVCache(tiny_model, KVCacheSpec(bits=8, group_size=8, residual=0, pre_rope=pre_rope))
    got, logits = greedy(tiny_model, ids, cache)
    assert cache.layers[0].quantized_keys.length == 24  # 31 cached tokens: most of them read back quantized
    assert torch.equal(got, expected)
    difference = (logits - expected_logits).abs().max()
    assert 0 < difference < 0.05 * expected_logits.abs().max()
    _, two_bit_logits = greedy(tiny_model, ids, QuantizedKVCache(tiny_model, KVCacheSpec(bits=2, group_size=8,
                                                                                          residual=0)))
    assert (two_bit_logits - expected_logits).abs().max() > 3 * difference  # the test can tell bits apart


def test_rotation_is_undone_exactly_and_matches_the_model():
    model = tiny_llama()
    rotation = KeyRotation.of_model(model, head_dim=16)
    keys, positions = random(2, 2, 9, 16), torch.arange(3, 12).expand(2, 9)
    assert torch.allclose(rotation.unrotate(rotation.rotate(keys, positions), positions), keys, atol=1e-6)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = model.model.rotary_emb(keys, positions)
    assert torch.allclose(rotation.rotate(keys, positions), apply_rotary_pos_emb(keys, keys, cos, sin)[1], atol=1e-6)


@torch.no_grad()
def test_pre_rope_cache_stores_the_key_projection_before_rotation(tiny_model):
    ids = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(3))
    projected = {}
    hook = tiny_model.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda module, args, output: projected.setdefault("keys", output))
    cache = QuantizedKVCache(tiny_model, KVCacheSpec(bits=4, group_size=8, residual=4, pre_rope=True))
    tiny_model(input_ids=ids, use_cache=True, **with_cache(tiny_model, cache))
    hook.remove()
    pre_rope = projected["keys"].view(1, 21, 2, 16).transpose(1, 2)  # [batch, kv heads, tokens, head_dim]
    stored = cache.layers[0].quantized_keys
    assert stored.length == 16
    expected = quantize_per_channel(pre_rope[..., :16, :], 4, 8)
    step = expected.scale.float().max()
    got = dequantize_per_channel(stored, torch.float32)
    assert (got - dequantize_per_channel(expected, torch.float32)).abs().max() <= step + 1e-5
    assert torch.allclose(stored.scale.float(), expected.scale.float(), rtol=1e-2, atol=1e-4)


def test_pre_rope_matches_post_rope_at_high_bits(tiny_model):
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    logits = {}
    for name, spec in {"fp": None,
                       "post": KVCacheSpec(bits=8, group_size=8, residual=4),
                       "pre": KVCacheSpec(bits=8, group_size=8, residual=4, pre_rope=True)}.items():
        cache = DynamicCache(config=tiny_model.config) if spec is None else QuantizedKVCache(tiny_model, spec)
        with torch.no_grad():
            logits[name] = torch.cat([tiny_model(input_ids=ids[:, b : b + 4], **with_cache(tiny_model, cache)).logits
                                      for b in range(0, 40, 4)], dim=1)
    scale = logits["fp"].abs().max()
    assert (logits["pre"] - logits["post"]).abs().max() < 0.02 * scale
    assert (logits["pre"] - logits["fp"]).abs().max() < 0.02 * scale
    assert not torch.equal(logits["pre"], logits["post"])


def check_nbytes_follow_the_formula(model, spec: KVCacheSpec, tokens: int) -> AttentionShape:
    """Feed `tokens` random tokens 7 at a time through a cache of `spec`: after every chunk the cache
    holds exactly the bytes memory.cache_bytes counts. Returns the model's attention shape."""
    shape = AttentionShape.of_config(model.config)
    cache = QuantizedKVCache(model, spec)
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for begin in range(0, tokens, 7):
            model(input_ids=ids[:, begin : begin + 7], **with_cache(model, cache))
            assert cache.nbytes() == cache_bytes(shape, spec, min(begin + 7, tokens))
    return shape


@pytest.mark.parametrize("spec", [KVCacheSpec(bits=4, group_size=8, residual=6),
                                  KVCacheSpec(bits=2, group_size=16, residual=0, pre_rope=True),
                                  KVCacheSpec(bits=8, group_size=32, residual=3)])
def test_bytes_per_token_formula_equals_what_the_cache_holds(spec):
    shape = check_nbytes_follow_the_formula(tiny_llama().half(), spec, 50)
    fp16 = bytes_per_token(shape, None, 50)
    assert fp16 == 2 * 2 * 2 * 2 * 16  # K and V x layers x kv heads x head_dim x 2 bytes
    assert bytes_per_token(shape, spec, 50) < fp16
    long_context = bytes_per_token(shape, spec, 100_000)
    codes = spec.bits / 8 * 2 * 2 * 2 * 16
    value_groups, key_groups = 16 / min(spec.group_size, 16), 16 / spec.group_size
    params = 4 * 2 * 2 * (value_groups + key_groups)
    positions = 4 * 2 if spec.pre_rope else 0
    assert long_context == pytest.approx(codes + params + positions, rel=1e-2)


@pytest.mark.parametrize("kind", ["int8-token", "fp8"])
def test_coded_bytes_per_token_equal_what_the_cache_holds(kind):
    """A byte a number and a float32 scale per token and head, from the first token on."""
    spec = KVCacheSpec(kind=kind)
    shape = check_nbytes_follow_the_formula(tiny_llama().half(), spec, 30)
    assert bytes_per_token(shape, spec, 1) == 2 * 2 * 2 * (16 + 4)  # K and V x layers x kv heads x (codes + scale)


def test_fp8_rows_round_to_nearest_e4m3_of_each_row_over_its_scale():
    """The slow definition, number by number: the e4m3 value nearest x / scale (ties to even
    mantissas), from e4m3's full table of finite values."""
    from lowbit.kv.row_codes import dequantize_rows, quantize_rows

    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    table = table[table.isfinite()].unique()
    x = random(3, 5, 16, seed=2) * torch.logspace(-4, 2, 16)
    x[0, 0] = 0.0  # a row of zeros: scale 0, codes 0
    codes, scales = quantize_rows(x, torch.float8_e4m3fn)
    assert scales[0, 0] == 0 and not codes[0, 0].float().any()
    for row in range(1, 15):
        values, scale = x.view(15, 16)[row], float(x.view(15, 16)[row].abs().max() / 448)
        distance = (values[:, None] / scale - table[None, :]).abs()
        nearest = table[distance.argmin(dim=1)]
        ties = (distance.sort(dim=1).values[:, :2].diff(dim=1).abs() < 1e-6).squeeze(1)
        got = codes.view(15, 16)[row].float()
        assert torch.equal(got[~ties], nearest[~ties])
    assert torch.equal(dequantize_rows(codes, scales, torch.float32), codes.float() * scales[..., None])


def test_every_row_kind_a_spec_names_has_its_codes():
    """spec.py names the kinds without importing torch; row_codes.py gives each its code dtype."""
    from lowbit.kv.row_codes import CODES
    from lowbit.kv.spec import ROW_KINDS

    assert set(CODES) == set(ROW_KINDS)
    assert all(KVCacheSpec(kind=kind).name == kind for kind in ROW_KINDS)


def test_int8_rows_round_to_nearest_integer_of_each_row_over_its_scale():
    """The slow definition: each number over its row's max|row| / 127, rounded half to even."""
    from lowbit.kv.row_codes import dequantize_rows, quantize_rows

    x = random(3, 5, 16, seed=3) * torch.logspace(-4, 2, 16)
    x[1, 2] = 0.0
    codes, scales = quantize_rows(x, torch.int8)
    assert codes.dtype == torch.int8 and scales[1, 2] == 0 and not codes[1, 2].any()
    for row, values in enumerate(x.view(15, 16)):
        scale = float(values.abs().max()) / 127
        if scale == 0:
            continue
        expected = [max(-127, min(127, round(float(v) / scale))) for v in values]  # Python rounds half to even
        assert codes.view(15, 16)[row].tolist() == expected
        assert codes.view(15, 16)[row].abs().max() == 127
    assert torch.equal(dequantize_rows(codes, scales, torch.float32), codes.float() * scales[..., None])


def test_bad_settings_fail_with_a_clear_message(tiny_model):
    with pytest.raises(ValueError, match="takes no group_size setting"):
        KVCacheSpec(kind="fp8", group_size=32)
    with pytest.raises(ValueError, match="takes no pre_rope setting"):
        KVCacheSpec(kind="int8-token", pre_rope=True)
    with pytest.raises(ValueError, match="multiple of 4"):
        KVCacheSpec(bits=2, group_size=6)
    with pytest.raises(ValueError, match="bits must be one of"):
        KVCacheSpec(bits=3)
    with pytest.raises(ValueError, match="does not divide the head dimension"):
        QuantizedKVCache(tiny_model, KVCacheSpec(bits=8, group_size=12))


def test_left_padded_beam_search_matches_the_full_precision_cache(tiny_model):
    """Beam search repeats and reorders the batch: every packed tensor and the stored positions must follow."""
    ids = torch.randint(1, 256, (2, 20), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :6], ids[1, :6] = 0, 0
    tiny_model.generation_config.pad_token_id = 0
    settings = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
    expected = tiny_model.generate(ids, **with_cache(tiny_model, DynamicCache(config=tiny_model.config)), **settings)
    cache = QuantizedKVCache(tiny_model, KVCacheSpec(bits=8, group_size=8, residual=0, pre_rope=True))
    assert torch.equal(tiny_model.generate(ids, **with_cache(tiny_model, cache), **settings), expected)
    assert cache.layers[0].positions.shape[0] == 6  # two prompts x three beams


def test_cache_keyword_follows_the_installed_forward_signature(tiny_model):
    """An unknown keyword vanishes into **kwargs, so the name must match the installed transformers."""

    class OlderSignature(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            return past_key_values

    class NewerSignature(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
            return cache

    marker = object()
    for model in (OlderSignature(), NewerSignature()):
        assert model(**with_cache(model, marker)) is marker
    assert cache_argument(OlderSignature()) == "past_key_values" and cache_argument(NewerSignature()) == "cache"
    assert cache_argument(tiny_model) in inspect.signature(tiny_model.forward).parameters
