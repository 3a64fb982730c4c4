"""Random models of real shapes: the Llama-3-8B-shaped one both sides of benchmarks/gpu_quant_speed.py
quantize, and a Qwen3-8B-shaped one for benchmarks/gpu_decode.py.

Weights' values do not change the work GPTQ does, so a model with Llama-3-8B's shapes and random
weights (transformers' own initialisation, seeded) stands in for the real one. Built on the GPU in
bf16 (seconds instead of minutes on the CPU), then moved to CPU memory, where a pipeline that
streams blocks to the GPU expects it. Imports only torch and what the caller passes in, so the
llm-compressor worker can use it with its own transformers.
"""

from __future__ import annotations

import torch


def llama3_8b_config(config_cls, layers: int = 32):
    return config_cls(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False,
    )


def qwen3_8b_config(config_cls, layers: int = 36):
    """Qwen3-8B's shapes: its q and k normalised per head before the rotary embedding."""
    return config_cls(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, tie_word_embeddings=False,
    )


def random_model(config, model_cls, seed: int = 0):
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    return model.to("cpu").eval()
