"""How much each layer would hurt the model under each candidate setting.

For a linear y = W x with calibration Hessian H = 2/n Σ x xᵀ, quantizing W to Ŵ changes its outputs
by a mean squared amount ½ tr(ΔW H ΔWᵀ) (ΔW = W - Ŵ), row by row: e_r = (ΔW H ΔWᵀ)_rr. Four
weightings turn that into a damage that adds up across layers, from cheapest to most faithful:

- `hessian`: Σ_r e_r, each layer's own output error (no extra pass).
- `fisher` (default): how much an output error costs depends on where the layer sits, so each row's
  error is weighted by the mean squared loss gradient of that output, f_r = 1/n Σ_t (∂L/∂y_t,r)² (a
  diagonal empirical Fisher). Taking inputs and output gradients as independent (K-FAC's
  assumption), the loss increase per token is ½ Σ_r f_r · ½ e_r = ¼ Σ_r f_r e_r (nats per token).
- `trace` (HAWQ-V2): ½ · Tr(∇²_W L)/n · ||ΔW||², the loss curvature around the layer's weights
  estimated with Hutchinson's method (budget.curvature), times the size of the weight error.
- `kl`: measured, not estimated: the KL to the original of the model with that one layer quantized
  to that candidate, on calibration windows (one forward pass per layer and candidate).

Statistics come from one pass of the unquantized model over the calibration windows; the extra
pass of a weighting (gradients, Hessian-vector products, KL scoring) runs on the first
`fisher_samples` windows. Each candidate is solved on every layer with the same solver the plan
will use (GPTQ on the float Hessian, or RTN), and ΔW is measured against the undamped H. A table
depends only on the model, the calibration tokens and the settings, so it is cached on disk under a
hash of them: a second budget on the same model is instant.

All Hessians of the model are held at once (a pass over the whole model, not block by block), which
is fine for models of up to a few billion parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.budget.bank import CandidateBank, KLFitness
from lowbit.budget.candidates import Candidate
from lowbit.budget.curvature import hutchinson_traces
from lowbit.budget.statistics import collect_statistics, planned_groups, solved_candidates
from lowbit.compare.cache import model_fingerprint, tensor_digest
from lowbit.models.architectures import Architecture

CACHE_VERSION = 1
"""Bump when the numbers a table holds change meaning; older cached tables are then ignored."""

WEIGHTINGS = ("fisher", "hessian", "trace", "kl")


def default_cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit"
    return Path(root) / "sensitivity"


@dataclass
class SensitivityTable:
    """Estimated damage of every (layer, candidate) pair that can be stored, with layer shapes.

    `damage[layer][candidate.key]`; a candidate a layer cannot take (a group size that does not
    divide its width) is absent for that layer.
    """

    weighting: str
    shapes: dict[str, tuple[int, int]]
    damage: dict[str, dict[str, float]]
    seconds: float = 0.0
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.shapes)

    def to_json(self) -> dict:
        return {"weighting": self.weighting, "shapes": {k: list(v) for k, v in self.shapes.items()},
                "damage": self.damage, "seconds": self.seconds, "meta": self.meta}

    @classmethod
    def from_json(cls, data: dict) -> SensitivityTable:
        shapes = {k: (int(v[0]), int(v[1])) for k, v in data["shapes"].items()}
        return cls(data["weighting"], shapes, data["damage"], data.get("seconds", 0.0), data.get("meta", {}))


def row_errors(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """(ΔW H ΔWᵀ)_rr for every row r: twice the mean squared error of that output."""
    delta = (weight - w_hat).double()
    return ((delta @ hessian.double()) * delta).sum(dim=1)


def measure_sensitivity(
    model: nn.Module,
    architecture: Architecture,
    calibration: torch.Tensor,
    candidates: list[Candidate],
    is_planned: Callable[[str], bool],
    *,
    weighting: str = "fisher",
    fisher_samples: int = 8,
    scale_dtype: str = "float16",
    method_options: dict[str, dict] | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 1,
) -> SensitivityTable:
    """The damage table of `candidates` on every planned linear, read from the cache when present.

    `method_options[method]` are the solver's options (e.g. GPTQ's damp), as the plan will use them.
    `fisher_samples` windows get the weighting's extra pass (gradients, trace probes, KL scoring).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if weighting != "hessian" and fisher_samples < 1:
        raise ValueError(f"the {weighting} weighting needs at least one calibration window for its extra pass "
                         "(--fisher-samples >= 1), or use --weighting hessian")
    method_options = method_options or {}
    groups = planned_groups(model, architecture, is_planned)
    if not groups:
        raise ValueError("no layer to plan: the recipe's ignore list leaves none")
    description = {
        "version": CACHE_VERSION, "model": model_fingerprint(model), "calibration": tensor_digest(calibration),
        "candidates": [c.key for c in candidates], "weighting": weighting,
        "fisher_samples": fisher_samples if weighting != "hessian" else 0, "scale_dtype": scale_dtype,
        "options": {c.method: method_options.get(c.method, {}) for c in candidates},
        "layers": [name for names, _ in groups for name in names],
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = (cache_dir or default_cache_dir()) / f"{key}.json"
    if path.is_file():
        return SensitivityTable.from_json(json.loads(path.read_text()))

    start = time.perf_counter()
    table = SensitivityTable(weighting, {}, {})
    for names, linears in groups:
        for name, linear in zip(names, linears):
            table.shapes[name] = (linear.out_features, linear.in_features)
            table.damage[name] = {}
    if weighting == "kl":
        _measured_kl(model, architecture, calibration, candidates, groups, table, fisher_samples,
                     method_options, scale_dtype)
    else:
        _estimated(model, calibration, candidates, groups, table, weighting, fisher_samples, method_options,
                   scale_dtype, batch_size)
    table.seconds = time.perf_counter() - start
    table.meta = {"key": key, "calibration_windows": int(calibration.shape[0]),
                  "calibration_seq_len": int(calibration.shape[1]), "fisher_samples": description["fisher_samples"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(table.to_json()))
    temporary.replace(path)
    return table


def _estimated(model, calibration, candidates, groups, table, weighting, windows, method_options, scale_dtype,
               batch_size) -> None:
    """Fill `table` with the hessian, fisher or trace estimate of every candidate's damage."""
    names = [name for group_names, _ in groups for name in group_names]
    traces = hutchinson_traces(model, names, calibration, windows) if weighting == "trace" else {}
    stats, fisher = collect_statistics(model, groups, calibration, windows if weighting == "fisher" else 0,
                                       batch_size)
    hessians: dict[int, torch.Tensor] = {}  # the current group's, mirrored once
    for group, candidate, stacked, qweight in solved_candidates(stats, candidates, method_options, scale_dtype):
        if id(group) not in hessians:
            hessians = {id(group): group.stats.hessian}
        rows = [linear.out_features for linear in group.linears]
        w_hat = qweight.dequantize()
        delta = stacked - w_hat
        errors = row_errors(stacked, w_hat, hessians[id(group)]).split(rows)
        for name, error, part in zip(group.names, errors, delta.split(rows)):
            if weighting == "fisher":
                damage = 0.25 * float((fisher[name].double() * error).sum())
            elif weighting == "trace":
                damage = 0.5 * max(traces[name], 0.0) * float(part.double().square().sum())
            else:
                damage = float(error.sum())
            table.damage[name][candidate.key] = damage


def _measured_kl(model, architecture, calibration, candidates, groups, table, windows, method_options,
                 scale_dtype) -> None:
    """Fill `table` with the KL of the model with one layer at one candidate, all else in float."""
    bank = CandidateBank(model, architecture, calibration, candidates, set(table.layers), method_options, scale_dtype)
    fitness = KLFitness(model, calibration[:windows])
    pairs = [(name, c) for name in table.layers for c in candidates if (name, c.key) in bank.solutions]
    for name, candidate in tqdm(pairs, desc="measuring KL per layer and candidate", unit="model"):
        linear = model.get_submodule(name)
        original = linear.weight.data
        bank.apply(model, name, candidate)
        try:
            table.damage[name][candidate.key] = fitness(model, fitness.windows.shape[0])
        finally:
            linear.weight.data = original
