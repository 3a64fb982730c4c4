"""GPTQ (Frantar et al., 2022): quantize one column at a time and let the rest absorb the error.

The layer objective ||(W - Ŵ) X||² = tr((W - Ŵ) H (W - Ŵ)ᵀ) is quadratic with the same Hessian H for
every row, so all rows can be solved together. After column q is rounded, the optimal change of the
columns not yet quantized is the Optimal Brain Surgeon update

    W[:, rest] -= (w_q - ŵ_q) / Hinv[q, q] · Hinv[q, rest],

where Hinv is the inverse Hessian of the columns still free; dropping q from Hinv is a Schur
complement step. Two observations make this fast:
  * the rows of the upper Cholesky factor U of H⁻¹ are exactly those Schur-complemented rows, scaled
    by 1/sqrt(Hinv[q, q]), so one factorisation replaces every inverse update;
  * an update to a far-away column is only needed when that column is reached, so the updates of a
    block of columns are applied to the rest of the matrix in one matmul ("lazy batches").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import GroupParams, QuantizedWeight, WeightFormat, check_finite, column_groups
from lowbit.solvers.base import Solver, register_solver
from lowbit.solvers.clipping import ClipSearch
from lowbit.solvers.outliers import sparse_from_mask

CHOLESKY_RETRIES = 4
"""How many times the damping is raised tenfold before a Hessian is declared unusable."""


def layer_output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ), the objective GPTQ minimises.

    With H = 2/n Σ x xᵀ (HessianStats) it is twice the mean over tokens of ||(W - Ŵ) x||².
    """
    delta = (w - w_hat).to(hessian.dtype)
    return float(((delta @ hessian) * delta).sum())


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so H⁻¹ = UᵀU) with λ = damp · mean(diag H); also the damp used.

    With J the order-reversing permutation, J H J = L Lᵀ gives H = R Rᵀ for the upper triangular
    R = J L J, hence H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹ = J L⁻¹ J: one Cholesky and one triangular inverse,
    instead of Cholesky, full inverse and a second Cholesky (which is also several times slower
    on a CPU).

    Calibration Hessians are often singular (fewer tokens than inputs, correlated features); the
    damping makes them positive definite. When it is not enough, it is raised tenfold a few times
    rather than failing a long run on one layer.
    """
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean()
    for _ in range(CHOLESKY_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex((hessian + damp * mean_diag * eye).flip(0, 1))
        if info == 0:
            inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
            if torch.isfinite(inverse).all():
                return inverse.flip(0, 1), damp
        damp = 10 * damp if damp > 0 else 1e-3
    raise ValueError(
        f"the Hessian is not positive definite even with damping {damp / 10:g} x mean(diag H); "
        "calibrate on more tokens or check the layer's inputs for NaN/Inf"
    )


def prepare_problem(
    weight: torch.Tensor, stats: HessianStats | None, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Working copies (W, H) for a second-order solver, checked, with dead inputs removed.

    Both are at least float32 (a float64 weight stays float64, which the tests use to compare
    exactly) and on the weight's device. An input that is always zero (H[j, j] = 0) carries no
    information: its weights become 0 and its diagonal 1, so H stays factorable.
    """
    check_finite(weight)
    if stats is None:
        raise ValueError(f"{method} needs calibration statistics (a HessianStats for this layer's input)")
    columns = weight.shape[1]
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W = weight.to(dtype=dtype, copy=True)
    H = stats.hessian.to(device=weight.device, dtype=dtype, copy=True)
    if H.shape != (columns, columns):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not fit a weight with {columns} inputs")
    if not torch.isfinite(H).all():
        raise ValueError("the Hessian contains NaN/Inf; check the calibration inputs of this layer")
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def _block_params(params: list[GroupParams | None], first: int, count: int) -> GroupParams:
    """The static parameters of groups first..first+count-1 side by side, as the fused kernel reads them."""
    chosen = params[first : first + count]
    return GroupParams(scale=torch.cat([p.scale for p in chosen], dim=1),
                       zero=None if chosen[0].zero is None else torch.cat([p.zero for p in chosen], dim=1))


def _fused_block_solver(fmt: WeightFormat, W: torch.Tensor, block_size: int):
    """kernels.gptq_block.gptq_block when it can run this solve (CUDA, Triton, a supported format), else None."""
    from lowbit.kernels import triton_available

    if not (W.is_cuda and triton_available()):
        return None
    from lowbit.kernels import gptq_block

    return gptq_block.gptq_block if gptq_block.supports(fmt, W.shape[1], block_size, W) else None


@register_solver
@dataclass
class GPTQ(Solver):
    """GPTQ with lazy batches, optional act-order (desc_act), static groups and clipping search.

    `damp` is relative to the mean diagonal of H. `act_order` quantizes the columns with the largest
    H[i, i] (the most active inputs) first, while many columns remain to absorb their error; the
    groups then follow processing order, so `group_index` is a permutation (`g_idx`). With
    `static_groups` the group parameters are fitted up front on the original contiguous groups, which
    keeps the plain layout that fast kernels expect at a small cost in accuracy.

    metadata: "damp", the relative damping actually used (raised when H would not factor), and
    "hessian_error", tr((W - Ŵ) H (W - Ŵ)ᵀ) under that damped H, summed as the columns are solved
    (per row in row_metadata).
    """

    name: ClassVar[str] = "gptq"
    needs_hessian: ClassVar[bool] = True
    rows_independent: ClassVar[bool] = True

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    clip_search: bool = False

    def __post_init__(self) -> None:
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None) -> QuantizedWeight:
        return self._solve(weight, fmt, stats, None)

    def solve_keeping(
        self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None, keep: torch.Tensor
    ) -> QuantizedWeight:
        """GPTQ where the `keep` weights are stored exactly (SpQR's outliers): they add no error, so
        nothing compensates for them, ranges are fitted without them, and each keeps the value the
        updates of earlier columns gave it (the sparse part holds that value minus the grid's)."""
        return self._solve(weight, fmt, stats, keep)

    def _solve(
        self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None, keep: torch.Tensor | None
    ) -> QuantizedWeight:
        W, H = prepare_problem(weight, stats, self.name)
        rows, columns = W.shape
        dtype = W.dtype

        # Matrix-level parameters (a per-tensor scale, learned tables) see the weights as given,
        # weighted by how active each input is.
        fmt = fmt.prepare(W, H.diagonal())
        group_size = fmt.group_size_for(columns)
        fit_all = partial(ClipSearch().fit, fmt) if self.clip_search else fmt.fit
        if keep is not None:
            keep = keep.to(W.device)
            exact = torch.zeros_like(W)  # the values kept weights end with, in processing order

        def fit(w: torch.Tensor, kept: torch.Tensor | None) -> GroupParams:
            # Kept weights are zero to the fit: zero is on every grid, so they do not widen it.
            return fit_all(w if kept is None else w.masked_fill(kept, 0.0))
        groups = column_groups(columns, group_size)
        params: list[GroupParams | None] = [None] * len(groups)
        if self.static_groups:
            params = [fit(W[:, start:end], None if keep is None else keep[:, start:end]) for start, end in groups]

        perm = torch.arange(columns, device=W.device)
        if self.act_order:
            perm = torch.argsort(H.diagonal(), descending=True, stable=True)
            W, H = W[:, perm], H[perm][:, perm]
            keep = None if keep is None else keep[:, perm]
        # Group used at each processing position: static groups keep the original layout, dynamic
        # ones are consecutive in processing order.
        group_of = (perm if self.static_groups else torch.arange(columns, device=W.device)) // group_size
        group_of_list = group_of.tolist()

        U, damp = inverse_hessian_factor(H, self.damp)
        codes = torch.empty(rows, columns, dtype=torch.uint8, device=W.device)
        row_error = torch.zeros(rows, dtype=dtype, device=W.device)
        # The fused kernel fits dynamic groups itself (min-max only) or takes static ones in their
        # plain layout; act-order static groups and kept weights stay in the torch loop.
        fusable = keep is None and (not (self.static_groups or self.clip_search)
                                    or (self.static_groups and not self.act_order))
        fused = _fused_block_solver(fmt, W, self.block_size) if fusable else None
        for i1 in range(0, columns, self.block_size):
            i2 = min(i1 + self.block_size, columns)
            W1 = W[:, i1:i2].clone()
            U1 = U[i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            if fused is not None and self.static_groups:  # the same column loop, one kernel per block (GPU)
                codes[:, i1:i2], Err1, _, _ = fused(W1, U1, fmt, _block_params(params, i1 // group_size,
                                                                               -(-(i2 - i1) // group_size)))
            elif fused is not None:
                codes[:, i1:i2], Err1, scales, zeros = fused(W1, U1, fmt)
                for j, start in enumerate(range(i1, i2, group_size)):
                    zero = None if zeros is None else zeros[:, j : j + 1]
                    params[group_of_list[start]] = GroupParams(scales[:, j : j + 1], zero)
            else:
                for i in range(i2 - i1):
                    col = i1 + i
                    group = group_of_list[col]
                    if params[group] is None:
                        # Fit on the weights as they are now. Columns of this block hold their updates
                        # in W1; columns past the block still lack this block's (lazy) updates.
                        end = min(col + group_size, columns)
                        pending = Err1 @ U[i1:i2, i2:end]
                        params[group] = fit(
                            torch.cat([W1[:, i : end - i1], W[:, i2:end] - pending], dim=1),
                            None if keep is None else keep[:, col:end],
                        )
                    p = params[group]
                    w = W1[:, i : i + 1]
                    code = fmt.encode(w, p)
                    codes[:, col : col + 1] = code
                    err = (w - fmt.decode(code, p)) / U1[i, i]
                    if keep is not None:
                        kept = keep[:, col : col + 1]
                        err = err.masked_fill(kept, 0.0)
                        exact[:, col : col + 1] = w.masked_fill(~kept, 0.0)
                    W1[:, i + 1 :].addmm_(err, U1[i : i + 1, i + 1 :], alpha=-1)  # -= err ⊗ U1[i, i+1:]
                    Err1[:, i : i + 1] = err
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)  # the block's updates, all at once
            row_error += Err1.square().sum(dim=1)

        inverse = torch.argsort(perm)
        group_index = torch.empty_like(group_of)
        group_index[perm] = group_of
        qweight = QuantizedWeight(
            format=fmt,
            codes=codes[:, inverse],
            scale=torch.cat([p.scale for p in params], dim=1),
            zero=None if params[0].zero is None else torch.cat([p.zero for p in params], dim=1),
            group_index=group_index,
            # Each step's squared error / Hinv[q, q] is the exact increase of the objective, so
            # their sum is tr((W - Ŵ) H (W - Ŵ)ᵀ) for the damped H (dead inputs zeroed).
            metadata={"damp": damp, "hessian_error": float(row_error.sum())},
            row_metadata={"hessian_error": row_error},
        )
        if keep is not None and keep.any():
            original_keep = keep[:, inverse]
            qweight.sparse = sparse_from_mask(original_keep, exact[:, inverse] - qweight.dequantize())
        return qweight
