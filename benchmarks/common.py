"""The protocol every SmolLM2 accuracy benchmark shares, in one place.

Calibration: random windows of ../shared/data/wikitext-2/valid.txt (seed 0). Evaluation: the first
`eval_windows` non-overlapping 2048-token windows of test.txt, never the same file; the original's
log-probabilities are computed once, so each row costs one forward pass of the quantized model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.calibrate.data import calibration_windows, load_text, tokenize_text
from lowbit.evaluate import ReferenceLogProbs
from lowbit.models.loading import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
EVAL_SEQ_LEN = 2048


@dataclass
class Protocol:
    loaded: LoadedModel
    calibration: torch.Tensor
    test_tokens: torch.Tensor
    eval_kwargs: dict
    reference: ReferenceLogProbs

    @property
    def original(self) -> nn.Module:
        return self.loaded.model


def embedded_model_protocol(samples: int, seq_len: int, eval_windows: int) -> Protocol:
    """The embedded model, its calibration windows, the test tokens and the original's log-probabilities."""
    torch.manual_seed(0)
    loaded = load_model(None)
    calibration = calibration_windows(loaded.tokenizer, load_text(str(DATA / "valid.txt")), samples, seq_len, seed=0)
    test_tokens = tokenize_text(loaded.tokenizer, load_text(str(DATA / "test.txt")))
    eval_kwargs = dict(seq_len=EVAL_SEQ_LEN, max_windows=eval_windows)
    return Protocol(loaded, calibration, test_tokens, eval_kwargs,
                    ReferenceLogProbs(loaded.model, test_tokens, **eval_kwargs))
