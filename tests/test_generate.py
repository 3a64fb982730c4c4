"""StaticDecoder: its step-by-step logits and greedy tokens are the HF model's full-sequence ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.generate import DecodeError, StaticDecoder
from tests.conftest import tiny_llama


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
