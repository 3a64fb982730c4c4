"""HQQ (Badri & Shaji, 2023) through its own `HQQLinear`: data-free half-quadratic fit of scale and zero.

HQQ always fits a zero point per group, stores scale and zero in its compute dtype (float16 here, its
default) and needs no calibration data. Each linear is quantized with `HQQLinear` on the CPU and its
`dequantize()` output (what HQQ's own forward uses) becomes the dense weight.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time
from typing import Any

import torch

from lowbit.compare.grid import Scheme
from lowbit.compare.peers.base import Peer, PeerJob, PeerResult, integer_bits_per_weight, register_peer

COMPUTE_DTYPE = torch.float16


@register_peer
class HQQPeer(Peer):
    name = "hqq"
    tool = "hqq"
    needs_calibration = False

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("hqq") is None:
            return "hqq is not installed (pip install hqq, or pip install 'lowbit[peers]')"
        return None

    def unsupported(self, scheme: Scheme) -> str | None:
        from hqq.core.quantize import Quantizer

        if scheme.symmetric:
            return "HQQ fits a zero point per group: asymmetric schemes only"
        if scheme.bits not in Quantizer.SUPPORTED_BITS:
            return f"HQQ supports {Quantizer.SUPPORTED_BITS} bits, not {scheme.bits}"
        if scheme.group_size == 0:
            return "HQQ has no per-tensor scheme"
        if scheme.group_size > 0 and scheme.group_size % 8:
            return "HQQ needs a group size that is a multiple of 8"
        return None

    def settings(self, scheme: Scheme) -> dict[str, Any]:
        return {"nbits": scheme.bits, "group_size": None if scheme.group_size == -1 else scheme.group_size,
                "axis": 1, "optimize": True, "compute_dtype": str(COMPUTE_DTYPE), "version": _version()}

    def quantize(self, job: PeerJob) -> PeerResult:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        group = None if job.scheme.group_size == -1 else job.scheme.group_size
        config = BaseQuantizeConfig(nbits=job.scheme.bits, group_size=group, axis=1)
        state: dict[str, torch.Tensor] = {}
        shapes = []
        start = time.perf_counter()
        for name in job.linear_names:
            linear = job.model.get_submodule(name)
            source = torch.nn.Linear(linear.in_features, linear.out_features, bias=False)
            source.weight.data = linear.weight.data.detach().float().clone()
            layer = HQQLinear(source, quant_config=config, compute_dtype=COMPUTE_DTYPE, device="cpu", del_orig=True)
            state[f"{name}.weight"] = layer.dequantize().reshape(linear.weight.shape).to(linear.weight.dtype)
            shapes.append(linear.weight.shape)
        seconds = time.perf_counter() - start
        return PeerResult(
            state=state,
            bits_per_weight=integer_bits_per_weight(shapes, job.scheme, scale_bits=16, zero_bits=16),
            seconds=seconds,
            version=_version(),
            settings={**self.settings(job.scheme), "storage": "codes + float16 scale and float16 zero per group"},
        )


def _version() -> str:
    try:
        return importlib.metadata.version("hqq")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
