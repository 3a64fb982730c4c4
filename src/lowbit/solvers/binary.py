"""BiLLM-style binarization (Huang et al., 2024) with GPTQ's error compensation.

Column groups of the weight are binarized one after another, in the order GPTQ would process them.
At the start of each group (`format.group_size` columns) the salient columns are chosen: the
`salient_fraction` of the group's columns with the largest Hessian-weighted energy
Σ_rows w² / d_j², where d_j is the diagonal of the Cholesky factor of H⁻¹ (BiLLM's criterion: a
weight hurts the output in proportion to w² / [H⁻¹]_jj, and d_j² is that diagonal for the columns
still free). They get a residual binarization (two signs), the rest plain or split binarization
(formats.binary). Parameters are fitted to the group as GPTQ's updates have left it; then each
column is rounded and its error, divided by d_j, is spread over the columns not yet rounded, as in
GPTQ (the lazy-batch update to later groups is the same matmul).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import FormatError, GroupParams, QuantizedWeight, WeightFormat, check_finite, column_groups
from lowbit.formats.binary import BinaryFormat
from lowbit.solvers.base import Solver, register_solver
from lowbit.solvers.gptq import inverse_hessian_factor


def salient_columns(block: torch.Tensor, factor_diagonal: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the max(1, round(fraction · width)) columns with the largest Σ_rows w² / d²
    (none when `fraction` is 0)."""
    width = block.shape[1]
    mask = torch.zeros(width, dtype=torch.bool, device=block.device)
    if fraction > 0:
        count = min(width, max(1, round(fraction * width)))
        energy = (block.square() / factor_diagonal.square()).sum(dim=0)
        mask[torch.topk(energy, count).indices] = True
    return mask


@register_solver
@dataclass
class Binary(Solver):
    """Binarization with Hessian-chosen salient columns (residual binarization) and GPTQ compensation.

    Needs format `binary` (`--format binary`, add `--bits 2` for BiLLM's split of the non-salient
    weights). `salient_fraction` of each group's columns are salient (0: none).
    metadata: "damp" used and "hessian_error" = tr((W − Ŵ) H (W − Ŵ)ᵀ) as in GPTQ.
    """

    name: ClassVar[str] = "binary"
    needs_hessian: ClassVar[bool] = True

    salient_fraction: float = 0.1
    damp: float = 0.01

    def __post_init__(self) -> None:
        if not 0 <= self.salient_fraction < 1:
            raise ValueError(f"salient_fraction must be in [0, 1), got {self.salient_fraction}")
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None) -> QuantizedWeight:
        if not isinstance(fmt, BinaryFormat):
            raise FormatError(f"method binary stores binary codes; use --format binary, not {fmt.name}")
        if stats is None:
            raise ValueError("binary needs calibration statistics (a HessianStats for this layer's input)")
        check_finite(weight)
        rows, columns = weight.shape
        dtype = torch.promote_types(weight.dtype, torch.float32)
        W = weight.to(dtype=dtype, copy=True)
        H = stats.hessian.to(device=weight.device, dtype=dtype, copy=True)
        if H.shape != (columns, columns):
            raise ValueError(f"Hessian of shape {tuple(H.shape)} does not fit a weight with {columns} inputs")
        dead = H.diagonal() == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        U, damp = inverse_hessian_factor(H, self.damp)

        codes = torch.empty(rows, columns, dtype=torch.uint8, device=W.device)
        salient = torch.zeros(columns, dtype=torch.bool, device=W.device)
        plain_params: list[GroupParams] = []
        salient_params: list[GroupParams] = []
        row_error = torch.zeros(rows, dtype=dtype, device=W.device)
        for i1, i2 in column_groups(columns, fmt.group_size_for(columns)):
            W1 = W[:, i1:i2].clone()
            U1 = U[i1:i2, i1:i2]
            mask = salient_columns(W1, U1.diagonal(), self.salient_fraction)
            salient[i1:i2] = mask
            plain = fmt.fit(W1[:, ~mask])
            residual = fmt.fit_residual(W1[:, mask]) if mask.any() else plain
            plain_params.append(plain)
            salient_params.append(residual)
            Err1 = torch.zeros_like(W1)
            for i, is_salient in enumerate(mask.tolist()):
                p = residual if is_salient else plain
                w = W1[:, i : i + 1]
                code = fmt.encode(w, p)
                codes[:, i1 + i : i1 + i + 1] = code
                err = (w - fmt.decode(code, p)) / U1[i, i]
                W1[:, i + 1 :].addmm_(err, U1[i : i + 1, i + 1 :], alpha=-1)
                Err1[:, i : i + 1] = err
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
            row_error += Err1.square().sum(dim=1)

        has_salient = self.salient_fraction > 0
        fmt = fmt.with_salient(salient if has_salient else None)
        groups = [p for pair in zip(plain_params, salient_params) for p in pair] if has_salient else plain_params
        return QuantizedWeight(
            format=fmt,
            codes=codes,
            scale=torch.cat([p.scale for p in groups], dim=1),
            zero=torch.cat([p.zero for p in groups], dim=1),
            group_index=fmt.group_index(columns).to(W.device),
            metadata={"damp": damp, "hessian_error": float(row_error.sum())},
            row_metadata={"hessian_error": row_error},
        )
