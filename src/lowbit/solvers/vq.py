"""Vector quantization with second-order error feedback (GPTVQ, van Baalen et al. 2024; VPTQ, Liu et al. 2024).

GPTQ (solvers/gptq.py) rounds one column and moves its error onto the columns not yet quantized.
Here `dim` columns are quantized at once, to one codeword per row, and their error moves on the
same way. With U the upper Cholesky factor of H⁻¹ (as in GPTQ) and S the vector's columns, fixing
W[:, S] to Q changes the best remaining columns by

    E = (W[:, S] - Q) · U[S, S]⁻¹,        W[:, rest] -= E · U[S, rest],

and raises the objective tr(ΔW H ΔWᵀ) by ||E||² per row: this is GPTQ's column step applied to the
d columns one after the other with Q fixed, written as one triangular solve. The codeword itself
is the nearest under the diagonal weighting 1/U[t, t]², the per-column cost GPTQ's step uses
(GPTVQ's choice; the exact cost ||(W_S - Q) U_SS⁻¹||² would need a search over the full metric).
Updates of a block of columns reach the rest of the matrix in one matmul (lazy batches).

Codebooks (formats/vector.py) are fitted by Hessian-diagonal-weighted k-means when the solver
reaches their first column, on the weights as updated so far, so a per-column-group codebook
learns the weights it will actually encode. A format that already has codebooks keeps them.
`error_feedback=False` gives plain nearest-codeword VQ (weighted by the Hessian diagonal) with
the same codebooks, the baseline the feedback improves on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import FormatError, QuantizedWeight, WeightFormat
from lowbit.formats.vector import KMEANS_ITERATIONS, VectorFormat, nearest_codewords
from lowbit.solvers.base import Solver, register_solver
from lowbit.solvers.gptq import inverse_hessian_factor, layer_output_error, prepare_problem


@register_solver
@dataclass
class VQ(Solver):
    """GPTVQ-style vector quantization into a VectorFormat (`--format vq`).

    metadata: "damp" (the relative damping used) and "hessian_error", tr((W - Ŵ) H (W - Ŵ)ᵀ) under
    the undamped Hessian (dead inputs zeroed).
    """

    name: ClassVar[str] = "vq"
    needs_hessian: ClassVar[bool] = True
    format_families: ClassVar[tuple[str, ...] | None] = ("vq",)

    damp: float = 0.01
    block_size: int = 128
    error_feedback: bool = True
    kmeans_iterations: int = KMEANS_ITERATIONS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.block_size < 1 or self.kmeans_iterations < 1:
            raise ValueError("block_size and kmeans_iterations must be >= 1")

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None) -> QuantizedWeight:
        if not isinstance(fmt, VectorFormat):
            raise FormatError("method vq quantizes into codebooks of vectors: use format vq (--format vq)")
        W, H = prepare_problem(weight, stats, self.name)
        original = W.clone()
        rows, columns = W.shape
        fmt.check_width(columns)
        d = fmt.dim
        span = fmt.codebook_columns(columns)
        scale = fmt.fit(W).scale.to(W.dtype)
        importance = H.diagonal().clone()
        U, damp = inverse_hessian_factor(H, self.damp)
        generator = torch.Generator(device=W.device).manual_seed(self.seed)
        books: list[list[torch.Tensor]] = [[] for _ in fmt.stage_bits]
        if fmt.codebooks is not None:
            books = [list(stage.to(W.device, W.dtype)) for stage in fmt.codebooks]
        codes = torch.empty(len(fmt.stage_bits), rows, columns // d, dtype=torch.int32, device=W.device)
        block = max(d, self.block_size // d * d)

        for i1 in range(0, columns, block):
            i2 = min(i1 + block, columns)
            W1 = W[:, i1:i2].clone()
            U1 = U[i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            for c in range(i1, i2, d):
                i = c - i1
                group = c // span
                if len(books[0]) == group:  # first column of a codebook group: fit it on the weights as they are now
                    end = min(c + span, columns)
                    current = torch.cat([W1[:, i : end - i1], W[:, i2:end] - Err1 @ U[i1:i2, i2:end]], dim=1)
                    fitted = fmt.fit_codebooks(current, scale, importance[c:end], generator, self.kmeans_iterations)
                    for stage, book in zip(books, fitted):
                        stage.append(book.to(W.dtype))
                w = W1[:, i : i + d]
                U_SS = U1[i : i + d, i : i + d]
                weighting = U_SS.diagonal().square().reciprocal() if self.error_feedback else importance[c : c + d]
                target = w / scale
                q = torch.zeros_like(target)
                for s, stage in enumerate(books):
                    index = nearest_codewords(target - q, stage[group], weighting)
                    codes[s, :, c // d] = index.to(torch.int32)
                    q = q + stage[group][index]
                if not self.error_feedback:
                    continue
                err = torch.linalg.solve_triangular(U_SS, w - q * scale, upper=True, left=False)
                W1[:, i + d :].addmm_(err, U1[i : i + d, i + d :], alpha=-1)
                Err1[:, i : i + d] = err
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)

        stored = dataclasses.replace(fmt, codebooks=tuple(torch.stack(stage).float() for stage in books))
        qweight = QuantizedWeight(
            format=stored,
            codes=codes,
            scale=scale.to(torch.float32),
            zero=None,
            group_index=torch.zeros(columns, dtype=torch.long, device=W.device),
        )
        error = layer_output_error(original, qweight.dequantize().to(original.dtype), H)
        qweight.metadata = {"damp": damp, "hessian_error": error}
        return qweight
