"""The protocol every SmolLM2 accuracy benchmark shares, in one place.

Calibration: random windows of ../shared/data/wikitext-2/valid.txt (seed 0). Evaluation: the first
`eval_windows` non-overlapping 2048-token windows of test.txt, never the same file; the original's
log-probabilities are computed once, so each row costs one forward pass of the quantized model.
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.api import resolve_device
from lowbit.calibrate.data import calibration_windows, load_text, tokenize_text
from lowbit.evaluate import ReferenceLogProbs
from lowbit.evaluate.kv_protocol import CacheScoring
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
    device: torch.device

    @property
    def original(self) -> nn.Module:
        return self.loaded.model

    def reference_through(self, kv_cache: CacheScoring) -> ReferenceLogProbs:
        """The original's log-probabilities on the same windows, scored through `kv_cache`'s chunks."""
        return _reference(self.original, self.test_tokens, self.device, kv_cache=kv_cache, **self.windows)

    @property
    def windows(self) -> dict:
        return {k: v for k, v in self.eval_kwargs.items() if k != "device"}


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="where blocks are quantized and models evaluated: auto (CUDA when present), cpu, cuda")


def machine_of(device: str | torch.device) -> str:
    """The processor that did the work, for a results table's header."""
    device = resolve_device(device) if isinstance(device, str) else device
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def embedded_model_protocol(samples: int, seq_len: int, eval_windows: int, device: str = "cpu") -> Protocol:
    """The embedded model, its calibration windows, the test tokens and the original's log-probabilities.

    The original stays on the CPU (each row quantizes a copy of it); `eval_kwargs` carries `device`,
    so every `evaluate(..., **eval_kwargs)` runs there.
    """
    torch.manual_seed(0)
    where = resolve_device(device)
    loaded = load_model(None)
    calibration = calibration_windows(loaded.tokenizer, load_text(str(DATA / "valid.txt")), samples, seq_len, seed=0)
    test_tokens = tokenize_text(loaded.tokenizer, load_text(str(DATA / "test.txt")))
    windows = dict(seq_len=EVAL_SEQ_LEN, max_windows=eval_windows)
    reference = _reference(loaded.model, test_tokens, where, **windows)
    return Protocol(loaded, calibration, test_tokens, {**windows, "device": where}, reference, where)


def _reference(original: nn.Module, tokens: torch.Tensor, device: torch.device, **kwargs) -> ReferenceLogProbs:
    """The original's log-probabilities computed on `device`; the original goes back to the CPU."""
    try:
        return ReferenceLogProbs(original.to(device), tokens, **kwargs)
    finally:
        original.to("cpu")
