"""Named schemes users know (`--scheme w4a16`), each a starting recipe that flags may override."""

from __future__ import annotations

from lowbit.formats.activation import ActivationFormat
from lowbit.kv.spec import KVCacheSpec
from lowbit.recipes.recipe import Recipe, RecipeError

INT8_PER_TOKEN = ActivationFormat(type="int", bits=8, granularity="token", dynamic=True)
FP8_PER_TOKEN = ActivationFormat(type="fp8_e4m3", granularity="token", dynamic=True)
FP8_STATIC = ActivationFormat(type="fp8_e4m3", granularity="tensor", dynamic=False)
INT4_PER_TOKEN = ActivationFormat(type="int", bits=4, granularity="token", dynamic=True)

GPTQ_RANGES = {"static_groups": True, "clip_search": True}
"""The integer schemes' GPTQ fits each group's range on the original weights with an MSE clipping
search, instead of on the error-updated weights when the column loop reaches it (the paper's way,
`--dynamic-groups --no-clip-search`): at low bits the updates widen later groups' ranges. On
SmolLM2-135M, asymmetric g64, 32 x 512 calibration tokens (benchmarks/results/gptq_ranges.md):
perplexity 1983 -> 118 at 2 bits, 40.8 -> 32.9 at 3 bits, and at 4 bits KL 0.186 -> 0.180 with
perplexity 20.35 -> 20.52; the quantize time grew from about 49 to 89 s on a busy 2-core CPU."""

PRESETS: dict[str, Recipe] = {
    "w4a16": Recipe(method="gptq", bits=4, symmetric=True, group_size="auto", method_options=GPTQ_RANGES),
    "w3a16": Recipe(method="gptq", bits=3, symmetric=False, group_size="auto", method_options=GPTQ_RANGES),
    "w2a16": Recipe(method="gptq", bits=2, symmetric=False, group_size=32, method_options=GPTQ_RANGES),
    "w8a16": Recipe(method="gptq", bits=8, symmetric=True, group_size=-1, method_options=GPTQ_RANGES),
    "fp8": Recipe(method="rtn", format="fp8_e4m3", bits=8, group_size=-1, scale_dtype="float32"),
    # Weights and activations; names as llm-compressor's W8A8 (int8), FP8_DYNAMIC and FP8 (static).
    "w8a8": Recipe(method="gptq", bits=8, symmetric=True, group_size=-1, activations=INT8_PER_TOKEN),
    "fp8-dynamic": Recipe(method="rtn", format="fp8_e4m3", bits=8, group_size=-1, scale_dtype="float32",
                          activations=FP8_PER_TOKEN),
    "fp8-static": Recipe(method="rtn", format="fp8_e4m3", bits=8, group_size=-1, scale_dtype="float32",
                         activations=FP8_STATIC),
    # QuaRot's W4A4KV4: rotated residual stream and online Hadamard before down_proj, int4 GPTQ
    # weights, int4 per-token inputs, int4 KV cache (keys per channel, values per token).
    "w4a4": Recipe(method="gptq", bits=4, symmetric=True, group_size="auto", method_options=GPTQ_RANGES,
                   transforms=["quarot"], activations=INT4_PER_TOKEN, kv_cache=KVCacheSpec(bits=4)),
    "nvfp4": Recipe(method="gptq", format="nvfp4", bits=4, group_size=16),
    "mxfp4": Recipe(method="gptq", format="mxfp4", bits=4, group_size=32),
    "nf4": Recipe(method="gptq", format="nf4", bits=4, group_size=64),
}


def preset(name: str) -> Recipe:
    try:
        return PRESETS[name].model_copy(deep=True)
    except KeyError:
        raise RecipeError(f"unknown scheme {name!r}; available: {', '.join(PRESETS)}") from None
