"""Orthogonal matrices for rotations: Hadamard matrices of order 2^k · m, or a random orthogonal one.

A Hadamard matrix (entries ±1, H Hᵀ = n I) scaled by 1/√n spreads every input channel evenly over
all outputs, which is what removes outlier channels (QuaRot). Orders that are powers of two come
from Sylvester's doubling. Model widths are often not (SmolLM2: 576 = 36 · 16, MLP 1536 = 12 ·
128), so the other factor comes from a Paley construction on a prime q:
  - Paley I, q ≡ 3 (mod 4): order q + 1 (12, 20, 24, 32, 44, 48, 60, 72, 80, ...);
  - Paley II, q ≡ 1 (mod 4): order 2(q + 1) (12, 28, 36, 60, 76, ...),
and the full matrix is the Kronecker product of that Paley matrix with a Sylvester one. Orders with
no such factorisation (e.g. 116) fall back to a random orthogonal matrix (QR of a seeded Gaussian),
which is as function-preserving but spreads outliers less evenly; `construction` says which was used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def sylvester(order: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of a power-of-two order, by repeated doubling [[H, H], [H, -H]]."""
    if not is_power_of_two(order):
        raise ValueError(f"Sylvester's construction needs a power of two, got {order}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i) with χ the quadratic character modulo the prime q (χ(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    character = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return character[(index[None, :] - index[:, None]) % q]


def paley(order: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of `order` from a Paley construction on a prime, or None if there is none."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + S with S the skew conference matrix
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(order, dtype=torch.float64) + s
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II from the symmetric conference matrix C
        c = torch.zeros(order // 2, order // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, plus) + torch.kron(torch.eye(order // 2, dtype=torch.float64), minus)
    return None


@dataclass(frozen=True)
class HadamardFactors:
    """H = kron(base, sylvester(power)) / √n: a small ±1 `base` (order 1 for a pure power of two)."""

    base: torch.Tensor
    power: int

    @property
    def order(self) -> int:
        return self.base.shape[0] * self.power

    @property
    def construction(self) -> str:
        m = self.base.shape[0]
        return f"sylvester({self.power})" if m == 1 else f"paley({m}) x sylvester({self.power})"

    def matrix(self) -> torch.Tensor:
        """The orthogonal (normalised) matrix, float64."""
        return torch.kron(self.base, sylvester(self.power)) / math.sqrt(self.order)


@lru_cache(maxsize=32)
def hadamard_factors(order: int) -> HadamardFactors | None:
    """The Kronecker factors of a Hadamard matrix of `order`, smallest Paley factor first; None if
    `order` is not 2^k times the order of a known Paley matrix."""
    if order < 1:
        raise ValueError(f"a Hadamard matrix needs a positive order, got {order}")
    if is_power_of_two(order):
        return HadamardFactors(torch.ones(1, 1, dtype=torch.float64), order)
    for base in range(2, order + 1):
        if order % base == 0 and is_power_of_two(order // base):
            h = paley(base)
            if h is not None:
                return HadamardFactors(h, order // base)
    return None


def random_orthogonal(order: int, seed: int) -> torch.Tensor:
    """A random orthogonal matrix (Haar distributed: QR of a Gaussian with the signs of R's diagonal)."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(order, order, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def random_signs(order: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (order,), generator=generator).double() * 2 - 1


def orthogonal_rotation(order: int, seed: int, randomize: bool = True) -> tuple[torch.Tensor, str]:
    """(Q, construction): Q = H · diag(±1) with seeded signs (QuaRot's randomized Hadamard) when a
    Hadamard matrix of `order` is known, else a seeded random orthogonal matrix. float64."""
    factors = hadamard_factors(order)
    if factors is None:
        return random_orthogonal(order, seed), "random orthogonal (no Hadamard construction for this order)"
    h = factors.matrix()
    if not randomize:
        return h, factors.construction
    return h * random_signs(order, seed)[None, :], f"{factors.construction} x random signs"
