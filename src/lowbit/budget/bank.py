"""Every candidate's solution on every layer, and the measured KL of models assembled from them.

Two budget methods measure the real model instead of adding estimates: the `kl` weighting scores
each (layer, candidate) by the KL of the model with that one layer quantized, and the evolutionary
search scores whole plans. Both assemble models from the same bank of solutions and score them on
calibration windows against the original's cached log-probabilities.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.budget.candidates import Candidate
from lowbit.budget.statistics import collect_statistics, planned_groups, solved_candidates
from lowbit.evaluate import ReferenceLogProbs, evaluate
from lowbit.formats.base import QuantizedWeight
from lowbit.models.architectures import Architecture


class CandidateBank:
    """The solution of every candidate on every planned layer, solved once on the float Hessians.

    Held as QuantizedWeights (uint8 codes plus scales): about one byte per weight per candidate.
    """

    def __init__(
        self, model: nn.Module, architecture: Architecture, calibration: torch.Tensor, candidates: list[Candidate],
        layers: set[str], method_options: dict[str, dict], scale_dtype: str,
    ) -> None:
        groups = planned_groups(model, architecture, lambda name: name in layers)
        stats, _ = collect_statistics(model, groups, calibration, fisher_samples=0)
        self.solutions: dict[tuple[str, str], QuantizedWeight] = {}
        for group, candidate, _, qweight in solved_candidates(stats, candidates, method_options, scale_dtype):
            pieces = qweight.split_rows([linear.out_features for linear in group.linears])
            for name, piece in zip(group.names, pieces):
                self.solutions[name, candidate.key] = piece

    def apply(self, model: nn.Module, name: str, candidate: Candidate) -> None:
        """Give layer `name` of `model` (the bank's model or a copy of it) the weights of `candidate`."""
        linear = model.get_submodule(name)
        linear.weight.data = self.solutions[name, candidate.key].dequantize().to(linear.weight.dtype)


class KLFitness:
    """KL of the model to the original on calibration windows, with cached reference log-probs."""

    def __init__(self, original: nn.Module, windows: torch.Tensor) -> None:
        self.windows = windows
        tokens = windows.reshape(-1)
        seq_len = windows.shape[1]
        self.references = {
            count: ReferenceLogProbs(original, tokens, seq_len, count, progress=False)
            for count in sorted({1, windows.shape[0]})
        }
        self.calls = 0

    def __call__(self, model: nn.Module, windows: int) -> float:
        self.calls += 1
        reference = self.references[windows]
        result = evaluate(model, self.windows.reshape(-1), self.windows.shape[1], windows, reference, progress=False)
        return float(result.kl)
