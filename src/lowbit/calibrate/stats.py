"""Second-order statistics of a linear layer's inputs, accumulated over calibration batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch


TRIANGLE_BLOCK = 128
"""Columns per block of the lower-triangle accumulation (smaller: less waste, slower matmuls)."""

GPU_TRIANGLE_BLOCK = 2048
"""The same for 16-bit inputs on a GPU, where a product must be large to run at tensor-core rate."""


@dataclass
class HessianStats:
    """Running mean of x xᵀ over the calibration tokens that reach one linear input.

    GPTQ's layer objective ||W X - Ŵ X||² has Hessian 2 X Xᵀ; the factor and the normalisation by
    the token count do not change the solution, they only keep the numbers in a sane range so that
    a relative damping term means the same thing for every layer. Linears that read the same input
    (q/k/v, gate/up) share one instance, so the product is computed once per input.

    The sum is symmetric, so only its lower triangle is accumulated, a block of columns at a time
    (a little over half the arithmetic of the full product for wide inputs); `hessian` mirrors it.
    """

    columns: int
    device: torch.device | str = "cpu"
    tokens: int = 0

    def __post_init__(self) -> None:
        self.sum_outer = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs of shape [..., columns] (any leading dims are tokens)."""
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] != self.columns:
            raise ValueError(f"expected inputs with {self.columns} features, got {x.shape[-1]}")
        x = x.to(device=self.sum_outer.device)
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            # Tensor cores on the 16-bit activations as they are, accumulating and returning float32:
            # the same sums as converting x first, at several times the rate. Blocks are wide here
            # (each product stays large), so the triangle saves a bit under half the work.
            for start in range(0, self.columns, GPU_TRIANGLE_BLOCK):
                end = min(start + GPU_TRIANGLE_BLOCK, self.columns)
                self.sum_outer[start:, start:end] += torch.mm(x[:, start:].T, x[:, start:end], out_dtype=torch.float32)
        else:
            x = x.float()
            for start in range(0, self.columns, TRIANGLE_BLOCK):
                end = min(start + TRIANGLE_BLOCK, self.columns)
                self.sum_outer[start:, start:end].addmm_(x[:, start:].T, x[:, start:end])
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """2/n · Σ x xᵀ, the Hessian of the mean squared output error."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer")
        lower = self.sum_outer.tril()
        return (lower + lower.tril(-1).T) * (2.0 / self.tokens)


@dataclass
class ChannelMagnitude:
    """Running mean of |x| per input channel over the calibration tokens: how much each channel is
    used, which AWQ takes as the salience of the weights that read it."""

    columns: int
    device: torch.device | str = "cpu"
    tokens: int = 0

    def __post_init__(self) -> None:
        self.abs_sum = torch.zeros(self.columns, dtype=torch.float32, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs of shape [..., columns]."""
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] != self.columns:
            raise ValueError(f"expected inputs with {self.columns} features, got {x.shape[-1]}")
        self.abs_sum += x.to(device=self.abs_sum.device, dtype=torch.float32).abs().sum(dim=0)
        self.tokens += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer")
        return self.abs_sum / self.tokens


@dataclass
class ChannelMaximum:
    """Running max |x| per input channel: the outliers SmoothQuant migrates into the weights, and
    (through its overall maximum) the range a static activation scale must cover."""

    columns: int
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        self.max_abs = torch.zeros(self.columns, dtype=torch.float32, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs of shape [..., columns]."""
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] != self.columns:
            raise ValueError(f"expected inputs with {self.columns} features, got {x.shape[-1]}")
        batch_max = x.to(device=self.max_abs.device, dtype=torch.float32).abs().amax(dim=0)
        torch.maximum(self.max_abs, batch_max, out=self.max_abs)
