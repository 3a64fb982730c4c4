"""The contract every number format follows, and the container a solver returns.

A *format* says how one weight matrix is stored: the code alphabet, how codes map back to real
numbers, and which parameters (scales, zero points) are shared by which weights. A *solver* decides
which codes to store. Keeping the two apart is what lets GPTQ run unchanged on any format that can
quantize one column at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch


class FormatError(ValueError):
    """A tensor or setting the format cannot represent; the message says what to change."""


@dataclass(frozen=True)
class GroupParams:
    """Parameters shared by the weights of one group of columns (one value per row, or one per tensor).

    `scale` and `zero` have shape [rows, 1] (or [1, 1] for a per-tensor format) so they broadcast
    against a [rows, cols] slice. `zero` is None for symmetric formats, whose zero point is implied.
    Values are already rounded to their storage dtype: solvers must quantize with exactly the numbers
    that will be saved, or the saved model would differ from the one that was measured.
    """

    scale: torch.Tensor
    zero: torch.Tensor | None


class WeightFormat(ABC):
    """How a 2-D weight [out_features, in_features] is stored, group by group along the input axis."""

    name: ClassVar[str]
    clippable: ClassVar[bool] = True
    """Whether `fit(w, clip=ratio)` can shrink the covered range (the clipping search relies on it);
    formats whose parameters are fitted in closed form (binary magnitudes, codebooks) cannot."""

    def prepare(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> WeightFormat:
        """The format to store matrix `w` in: self, or a copy holding parameters fitted to the whole
        matrix (NVFP4's per-tensor scale, learned lookup tables) that every group's `fit` relies on.

        Solvers call it once per matrix before fitting groups. `importance` ([columns], e.g. the
        Hessian diagonal) weights the columns for formats that learn from the data. A format whose
        matrix-level parameters are already set returns itself, so preparing twice is harmless.
        """
        return self

    @abstractmethod
    def group_size_for(self, columns: int) -> int:
        """Columns per group for a matrix of this width (the last group may be shorter)."""

    @abstractmethod
    def fit(self, w: torch.Tensor) -> GroupParams:
        """Choose parameters that cover every value of `w` (a [rows, cols] slice forming one group)."""

    @abstractmethod
    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """Codes (small non-negative integers, uint8) for `w` under `params`, rounding to nearest."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """Real values (float32) that `codes` stand for under `params`."""

    @abstractmethod
    def bits_per_weight(self, rows: int, columns: int) -> float:
        """Storage cost per weight of a [rows, columns] matrix, scales and zero points included."""

    def weight_shape(self, codes: torch.Tensor) -> torch.Size:
        """[rows, columns] of the matrix `codes` stand for: the codes' own shape for scalar formats
        (one code per weight); vector formats store one code per vector and say so here."""
        return codes.shape

    @property
    def rows_independent(self) -> bool:
        """True when each row's parameters depend on that row alone.

        Matrices that share an input (q/k/v) can then be stacked and solved as one, which a solver
        whose rows are independent too (GPTQ: every row has the same Hessian) does in one pass.
        """
        return False

    def round_trip(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """decode(encode(w)): the value the stored model will actually use in place of `w`."""
        return self.decode(self.encode(w, params), params)


@dataclass(frozen=True)
class SparseOutliers:
    """A few weights stored apart from the grid, as fp16 corrections added to the dequantized matrix.

    Kept in compressed-sparse-row form: `row_offsets` (int64, rows + 1) delimit each row's entries
    in `columns` (int64 column indices, ascending within a row) and `values` (float16). Storage is
    counted as a serving layout would hold it: 16 bits per value, 16 bits per column index (32 for
    matrices wider than 65536) and 32 bits per row offset.
    """

    row_offsets: torch.Tensor
    columns: torch.Tensor
    values: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.values.numel())

    def rows(self) -> torch.Tensor:
        """The row of each entry (expanded from the offsets)."""
        counts = self.row_offsets[1:] - self.row_offsets[:-1]
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def to_dense(self, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
        dense = torch.zeros(shape, dtype=torch.float32, device=self.values.device)
        dense[self.rows(), self.columns] = self.values.float()
        return dense

    def storage_bits(self, columns: int) -> int:
        index_bits = 16 if columns <= 1 << 16 else 32
        return self.count * (16 + index_bits) + 32 * int(self.row_offsets.numel())

    def cpu(self) -> SparseOutliers:
        return SparseOutliers(self.row_offsets.cpu(), self.columns.cpu(), self.values.cpu())


@dataclass(frozen=True)
class LowRankCorrection:
    """A rank-r side branch B·A (EoRA) added to the dequantized matrix: y = x·Ŵᵀ + (x·Aᵀ)·Bᵀ.

    `a` is [rank, in_features] and `b` [out_features, rank], both float16 as stored; the product is
    formed in float32 from those stored values, so the in-memory model is the saved one.
    """

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def to_dense(self) -> torch.Tensor:
        return self.b.float() @ self.a.float()

    def storage_bits(self) -> int:
        return 16 * (self.a.numel() + self.b.numel())

    def cpu(self) -> LowRankCorrection:
        return LowRankCorrection(self.a.cpu(), self.b.cpu())


@dataclass
class QuantizedWeight:
    """A weight matrix as stored: codes plus per-group parameters.

    `codes` is uint8 [rows, columns] for scalar formats; vector formats (formats/vector.py) store
    one int32 code per vector and codebook stage, which is why the matrix shape is `shape`. `scale` / `zero` have shape [rows or 1, n_groups]. `group_index[j]` is the group of column j;
    it is the identity layout (j // group_size) unless the solver processed columns out of order
    (GPTQ act-order), in which case it is what the checkpoint stores as `g_idx`. `metadata` holds
    numbers about the whole matrix; `row_metadata` per-row numbers (one value per row), which is
    what survives when a stacked solve is split back into its matrices. `sparse`, when a
    solver keeps outlier weights apart (EasyQuant, `--outliers`), is added to the decoded grid
    values; so is `lowrank`, a low-rank error correction (EoRA, `--eora-rank`).
    """

    format: WeightFormat
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_index: torch.Tensor
    metadata: dict[str, float] = field(default_factory=dict)
    row_metadata: dict[str, torch.Tensor] = field(default_factory=dict)
    sparse: SparseOutliers | None = None
    lowrank: LowRankCorrection | None = None

    @property
    def shape(self) -> torch.Size:
        """[rows, columns] of the weight matrix (not of `codes`, which vector formats shape their own way)."""
        return self.format.weight_shape(self.codes)

    @property
    def weight_count(self) -> int:
        """Number of weights this matrix stores: what bits_per_weight() is averaged over."""
        rows, columns = self.shape
        return rows * columns

    @property
    def has_trivial_group_index(self) -> bool:
        """True when column j belongs to group j // group_size (no act-order permutation to store)."""
        columns = self.shape[1]
        expected = torch.arange(columns, device=self.group_index.device) // self.format.group_size_for(columns)
        return bool(torch.equal(self.group_index, expected))

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix this stored weight stands for."""
        scale = self.scale[:, self.group_index]
        zero = None if self.zero is None else self.zero[:, self.group_index]
        dense = self.format.decode(self.codes, GroupParams(scale, zero))
        if self.sparse is not None:
            dense += self.sparse.to_dense(dense.shape)
        if self.lowrank is not None:
            dense += self.lowrank.to_dense()
        return dense

    def bits_per_weight(self) -> float:
        rows, columns = self.shape
        bits = self.format.bits_per_weight(rows, columns)
        if self.sparse is not None:
            bits += self.sparse.storage_bits(columns) / (rows * columns)
        if self.lowrank is not None:
            bits += self.lowrank.storage_bits() / (rows * columns)
        return bits

    def split_rows(self, sizes: list[int]) -> list[QuantizedWeight]:
        """The matrices that were stacked row-wise into this one (needs a rows_independent format).

        Per-row metadata is split and summed into each piece's metadata; whole-matrix metadata that
        has no per-row form (such as a damping factor shared by the stack) is kept as it is.
        """
        if not self.format.rows_independent:
            raise ValueError(f"{type(self.format).__name__} shares parameters across rows; it cannot be split")
        if self.sparse is not None or self.lowrank is not None:
            raise ValueError("a weight with sparse outliers or a low-rank correction cannot be split by rows")
        pieces = []
        for codes, scale, zero, *rows in zip(
            self.codes.split(sizes),
            self.scale.split(sizes),
            self.zero.split(sizes) if self.zero is not None else [None] * len(sizes),
            *(values.split(sizes) for values in self.row_metadata.values()),
        ):
            row_metadata = dict(zip(self.row_metadata, rows))
            metadata = {**self.metadata, **{key: float(values.sum()) for key, values in row_metadata.items()}}
            # Copies, not views: each piece is saved and freed on its own.
            pieces.append(QuantizedWeight(
                self.format, codes.clone(), scale.clone(), None if zero is None else zero.clone(),
                self.group_index.clone(), metadata, {key: values.clone() for key, values in row_metadata.items()},
            ))
        return pieces


def column_groups(columns: int, group_size: int) -> list[tuple[int, int]]:
    """[start, end) column ranges of consecutive groups; the last one may be shorter."""
    return [(start, min(start + group_size, columns)) for start in range(0, columns, group_size)]


def check_finite(w: torch.Tensor, what: str = "weight") -> None:
    """Refuse NaN/Inf early: quantizing them silently would poison every scale in their group."""
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise FormatError(
            f"{what} contains {bad} NaN/Inf value(s); fix or re-export the model before quantizing"
        )


def quantize_matrix(
    fmt: WeightFormat,
    w: torch.Tensor,
    fit: Callable[[torch.Tensor], GroupParams] | None = None,
    importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Round every group of `w` to nearest under parameters from `fit` (default: the format's own),
    after preparing the format for this matrix with `importance` (see `prepare`). A custom `fit`
    must belong to the prepared format: prepare `fmt` first when it has matrix-level parameters."""
    check_finite(w)
    fmt = fmt.prepare(w, importance)
    fit = fit or fmt.fit
    rows, columns = w.shape
    codes = torch.empty(rows, columns, dtype=torch.uint8, device=w.device)
    scales, zeros = [], []
    for start, end in column_groups(columns, fmt.group_size_for(columns)):
        params = fit(w[:, start:end])
        codes[:, start:end] = fmt.encode(w[:, start:end], params)
        scales.append(params.scale)
        zeros.append(params.zero)
    group_size = fmt.group_size_for(columns)
    return QuantizedWeight(
        format=fmt,
        codes=codes,
        scale=torch.cat(scales, dim=1),
        zero=None if zeros[0] is None else torch.cat(zeros, dim=1),
        group_index=torch.arange(columns, device=w.device) // group_size,
    )
