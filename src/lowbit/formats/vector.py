"""Vector quantization (VQ): `dim` consecutive weights of a row stored as one index into a codebook.

A row of W is cut into vectors of `dim` consecutive input weights. Each vector is the sum of one
entry of each codebook stage (the first codebook, then optionally a residual codebook fitted on
what the first leaves), times an optional per-row scale:

    W[r, v·dim : (v+1)·dim] = scale[r] · Σ_s codebook_s[group(v), codes[s, r, v]]

Codebooks are shared by every row of a layer, one per `group_size` input columns (-1: one for the
whole layer, the usual choice: a codebook of K·dim float16 values costs as much as K·dim/index-bits
weights, so it only pays off over many rows). The row scale (RMS of the row) lets rows of very
different magnitude share one codebook. This is the representation of AQLM/GPTVQ/VPTQ at one or
two codebooks; the codes are chosen by solvers/vq.py.

Storage per weight, exactly: (bits + residual_bits) / dim for the indices, plus the codebooks
(K·dim·16 bits per stage and group) and the row scales (one per row), amortised over the layer.

Codebooks are fitted by k-means in which each coordinate counts with the importance of its input
column (the Hessian diagonal under a solver) times the squared row scale, which is the
second-order cost of an error there: k-means++ seeding on a sample, then weighted Lloyd
iterations. Distances are computed as matmuls, chunked so that a distance block stays small.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lowbit.formats.base import FormatError, GroupParams, WeightFormat
from lowbit.formats.integer import PER_CHANNEL

CODEBOOK_DTYPE = torch.float16
"""Codebooks are stored in float16 and rounded to it before any code is chosen."""

DISTANCE_BLOCK = 1 << 20
"""Elements of one block of the point-to-codeword distance matrix (4 MiB in float32, cache-sized)."""

KMEANS_ITERATIONS = 25
"""Upper bound on Lloyd iterations; fitting stops earlier once no assignment changes."""

SEEDING_SAMPLE = 16
"""k-means++ seeds from at most this many points per codeword (a seeded random sample)."""

FITTING_SAMPLE = 64
"""Lloyd iterations run on at most this many points per codeword (a seeded uniform sample): a
centroid is a weighted mean, which 64 points estimate well, and a 1536 x 576 layer at d=4 has
221k vectors, whose full distance matrix each iteration would dominate the solve on a CPU."""

MIN_BITS, MAX_BITS = 2, 16
MAX_DIM = 8


@dataclass(frozen=True)
class VectorFormat(WeightFormat):
    """Codes into shared codebooks of `dim`-long vectors (see the module docstring).

    `bits`: log2 of the first codebook's size; `residual_bits`: of the second's (0: none).
    `codebooks` (one tensor [n_groups, K_s, dim] per stage, float32 holding float16 values) is None
    until a solver or `prepare` fits it. Codes are int32 [stages, rows, columns // dim].
    """

    name: ClassVar[str] = "vector"
    clippable: ClassVar[bool] = False

    dim: int = 4
    bits: int = 8
    residual_bits: int = 0
    group_size: int = PER_CHANNEL
    row_scale: bool = False
    scale_dtype: torch.dtype = torch.float16
    codebooks: tuple[torch.Tensor, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 2 <= self.dim <= MAX_DIM:
            raise FormatError(f"vector dimension must be 2..{MAX_DIM}, got {self.dim}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise FormatError(f"codebook bits must be {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if self.residual_bits and not MIN_BITS <= self.residual_bits <= MAX_BITS:
            raise FormatError(f"residual codebook bits must be 0 (none) or {MIN_BITS}..{MAX_BITS}, got {self.residual_bits}")
        if self.group_size != PER_CHANNEL and (self.group_size <= 0 or self.group_size % self.dim):
            raise FormatError(
                f"columns per codebook must be -1 (one per layer) or a positive multiple of the vector "
                f"dimension {self.dim}, got {self.group_size}"
            )
        if self.scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise FormatError(f"scales are stored as float16, bfloat16 or float32, not {self.scale_dtype}")
        if self.codebooks is not None:
            expected = [1 << bits for bits in self.stage_bits]
            if [book.shape[1:] for book in self.codebooks] != [torch.Size([k, self.dim]) for k in expected]:
                raise FormatError(f"codebooks must be [groups, K, {self.dim}] with K = {expected}")

    @property
    def stage_bits(self) -> tuple[int, ...]:
        """Index width of each codebook stage (one, or two with a residual codebook)."""
        return (self.bits, self.residual_bits) if self.residual_bits else (self.bits,)

    @property
    def rows_independent(self) -> bool:
        return False  # the codebook is shared by every row

    def describe(self) -> str:
        books = "+".join(f"2^{bits}" for bits in self.stage_bits)
        layout = "per layer" if self.group_size == PER_CHANNEL else f"per {self.group_size} columns"
        return f"vq d{self.dim} K={books} {layout}" + (" row-scaled" if self.row_scale else "")

    def group_size_for(self, columns: int) -> int:
        return columns  # row scales (the only per-group parameters) cover the whole row

    def codebook_columns(self, columns: int) -> int:
        """Input columns that share one codebook in a matrix this wide."""
        return columns if self.group_size == PER_CHANNEL else self.group_size

    def check_width(self, columns: int) -> None:
        if columns % self.dim:
            raise FormatError(f"vector dimension {self.dim} does not divide in_features={columns}; pick one that does")
        if self.group_size != PER_CHANNEL and columns % self.group_size:
            raise FormatError(
                f"{self.group_size} columns per codebook do not divide in_features={columns}; use -1 or a divisor"
            )

    def weight_shape(self, codes: torch.Tensor) -> torch.Size:
        return torch.Size([codes.shape[1], codes.shape[2] * self.dim])

    def fit(self, w: torch.Tensor) -> GroupParams:
        """Per-row scale: the row's RMS rounded to `scale_dtype` (ones, not stored, without row scales)."""
        if not self.row_scale:
            return GroupParams(torch.ones(w.shape[0], 1, device=w.device), None)
        rms = w.float().square().mean(dim=1, keepdim=True).sqrt()
        scale = rms.to(self.scale_dtype)
        return GroupParams(torch.clamp(scale, min=torch.finfo(self.scale_dtype).tiny).float(), None)

    def prepare(self, w: torch.Tensor, importance: torch.Tensor | None = None, seed: int = 0) -> VectorFormat:
        """Codebooks fitted on `w` (each group of columns on its own), weighted by `importance`."""
        if self.codebooks is not None:
            return self
        rows, columns = w.shape
        self.check_width(columns)
        importance = torch.ones(columns, device=w.device) if importance is None else importance.to(w.device)
        scale = self.fit(w).scale
        span = self.codebook_columns(columns)
        generator = torch.Generator(device=w.device).manual_seed(seed)
        stages: list[list[torch.Tensor]] = [[] for _ in self.stage_bits]
        for start in range(0, columns, span):
            books = self.fit_codebooks(w[:, start : start + span], scale, importance[start : start + span], generator)
            for stage, book in zip(stages, books):
                stage.append(book)
        return dataclasses.replace(self, codebooks=tuple(torch.stack(books) for books in stages))

    def fit_codebooks(
        self,
        w: torch.Tensor,
        scale: torch.Tensor,
        importance: torch.Tensor,
        generator: torch.Generator,
        iterations: int = KMEANS_ITERATIONS,
    ) -> list[torch.Tensor]:
        """One codebook per stage ([K_s, dim], float16 values) for the columns `w` ([rows, n·dim]).

        Each stage after the first is fitted on the residual the (rounded) stages before it leave.
        """
        x, weight = self.vectors(w / scale), self.vectors(scale.square() * importance.clamp(min=0).reshape(1, -1))
        largest = 1 << max(self.stage_bits)
        if x.shape[0] < largest:
            raise FormatError(
                f"a codebook of {largest} entries needs at least as many vectors, this layer has {x.shape[0]}; "
                "lower the codebook bits or the vector dimension"
            )
        if x.shape[0] > FITTING_SAMPLE * largest:
            pick = torch.randperm(x.shape[0], generator=generator, device=x.device)[: FITTING_SAMPLE * largest]
            x, weight = x[pick], weight[pick]
        books = []
        for bits in self.stage_bits:
            k = 1 << bits
            seeds = kmeans_plus_plus(x, weight, k, generator)
            book = weighted_kmeans(x, weight, seeds, iterations).to(CODEBOOK_DTYPE).float()
            books.append(book)
            x = x - book[nearest_codewords(x, book, weight)]
        return books

    def vectors(self, w: torch.Tensor) -> torch.Tensor:
        """[rows, n·dim] -> [rows·n, dim] (row-major: the vectors of row 0 first)."""
        return w.float().reshape(-1, self.dim)

    def _books(self) -> tuple[torch.Tensor, ...]:
        if self.codebooks is None:
            raise FormatError("this vector format has no codebooks yet: quantize with method vq or call prepare")
        return self.codebooks

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """Nearest codeword per vector of the full-width `w` (greedy over stages, unweighted)."""
        rows, columns = w.shape
        self.check_width(columns)
        span = self.codebook_columns(columns)
        x = (w.float() / params.scale.float()).reshape(rows, columns // self.dim, self.dim)
        codes = torch.empty(len(self.stage_bits), rows, columns // self.dim, dtype=torch.int32, device=w.device)
        per_group = span // self.dim
        for g in range(columns // span):
            part = x[:, g * per_group : (g + 1) * per_group].reshape(-1, self.dim)
            for s, books in enumerate(self._books()):
                book = books[g].to(w.device)
                index = nearest_codewords(part, book)
                codes[s, :, g * per_group : (g + 1) * per_group] = index.reshape(rows, per_group)
                part = part - book[index]
        return codes

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """scale · Σ_s codebook_s[group, code]: the float32 [rows, columns] matrix."""
        _, rows, n_vectors = codes.shape
        columns = n_vectors * self.dim
        return gather_codewords(codes, self._books(), self.codebook_columns(columns) // self.dim) * params.scale.float()

    def bits_per_weight(self, rows: int, columns: int) -> float:
        weights = rows * columns
        groups = columns // self.codebook_columns(columns)
        index_bits = sum(self.stage_bits) * weights / self.dim
        codebook_bits = sum(groups * (1 << bits) * self.dim * torch.finfo(CODEBOOK_DTYPE).bits for bits in self.stage_bits)
        scale_bits = rows * torch.finfo(self.scale_dtype).bits if self.row_scale else 0
        return (index_bits + codebook_bits + scale_bits) / weights


def gather_codewords(codes: torch.Tensor, codebooks: tuple[torch.Tensor, ...], vectors_per_group: int) -> torch.Tensor:
    """Σ_s codebooks[s][group(v), codes[s, r, v]] as a float32 [rows, n_vectors·dim] matrix."""
    _, rows, n_vectors = codes.shape
    group = torch.arange(n_vectors, device=codes.device) // vectors_per_group
    dense = None
    for stage, books in enumerate(codebooks):
        books = books.to(codes.device)
        flat = books.reshape(-1, books.shape[-1])
        values = flat[group * books.shape[1] + codes[stage].long()]  # [rows, n_vectors, dim]
        dense = values if dense is None else dense + values
    return dense.reshape(rows, -1)


def nearest_codewords(x: torch.Tensor, codebook: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_k Σ_t weight[i, t] (x[i, t] - codebook[k, t])² for every row i of x [n, dim].

    `weight` is [n, dim], [dim] (one weighting for all points) or None (plain squared distance).
    The distance is expanded as w·c² - 2 (w⊙x)·c (the w·x² term does not depend on k), one
    matmul, in blocks of rows so the [block, K] distance matrix stays small.
    """
    n, k = x.shape[0], codebook.shape[0]
    codebook = codebook.to(x.dtype)
    right = torch.cat([codebook.square(), codebook], dim=1).T.contiguous()  # [2·dim, K]
    index = torch.empty(n, dtype=torch.long, device=x.device)
    block = max(1, DISTANCE_BLOCK // k)
    for start in range(0, n, block):
        part = x[start : start + block]
        if weight is None:
            w = torch.ones_like(part)
        else:
            w = (weight if weight.ndim == 1 else weight[start : start + block]).to(x.dtype).expand_as(part)
        # One matmul: [w, -2 w⊙x] · [c², c]ᵀ = w·c² - 2 (w⊙x)·c.
        index[start : start + block] = (torch.cat([w, -2 * w * part], dim=1) @ right).argmin(dim=1)
    return index


def kmeans_plus_plus(x: torch.Tensor, weight: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k seeds by weighted k-means++ (Arthur & Vassilvitskii 2007) on a seeded sample of the points.

    The first seed is drawn with probability ∝ a point's total weight, each next one ∝ its weighted
    squared distance to the nearest seed so far. Sampling at most SEEDING_SAMPLE·k points keeps the
    k sequential steps cheap; Lloyd iterations over all points refine the seeds afterwards.
    """
    n = x.shape[0]
    mass = weight.sum(dim=1)
    if n > SEEDING_SAMPLE * k:
        pick = torch.multinomial(mass + 1e-12, SEEDING_SAMPLE * k, replacement=False, generator=generator)
        x, weight, mass = x[pick], weight[pick], mass[pick]
    seeds = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = torch.multinomial(mass + 1e-12, 1, generator=generator)
    seeds[0] = x[first[0]]
    distance = ((x - seeds[0]).square() * weight).sum(dim=1)
    for i in range(1, k):
        total = distance.sum()
        probabilities = distance if total > 0 else torch.ones_like(distance)
        choice = torch.multinomial(probabilities, 1, generator=generator)[0]
        seeds[i] = x[choice]
        distance = torch.minimum(distance, ((x - seeds[i]).square() * weight).sum(dim=1))
    return seeds


def weighted_kmeans(
    x: torch.Tensor, weight: torch.Tensor, centroids: torch.Tensor, iterations: int = KMEANS_ITERATIONS
) -> torch.Tensor:
    """Lloyd's algorithm for Σ_i Σ_t weight[i, t] (x[i, t] - c[a(i), t])², from `centroids`.

    With per-coordinate weights the best centroid is, coordinate by coordinate, the weighted mean
    of its points. A centroid (or coordinate) that gets no weight keeps its value.
    """
    centroids = centroids.clone()
    k = centroids.shape[0]
    assignment = None
    for _ in range(iterations):
        new_assignment = nearest_codewords(x, centroids, weight)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        mass = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assignment, weight)
        total = torch.zeros_like(mass).index_add_(0, assignment, weight * x)
        centroids = torch.where(mass > 0, total / mass.clamp(min=torch.finfo(x.dtype).tiny), centroids)
    return centroids


def vector_format(
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype,
    dim: int = 4,
    residual_bits: int = 0,
    row_scale: bool = False,
) -> VectorFormat:
    return VectorFormat(dim=dim, bits=bits, residual_bits=residual_bits, group_size=group_size,
                        row_scale=row_scale, scale_dtype=scale_dtype)
