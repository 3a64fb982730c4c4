"""Intel's AutoRound (Cheng et al., 2023: SignRound) as a peer, through its public `AutoRound` entry point.

AutoRound tunes each block's rounding offsets and min-max clipping with signed gradient descent on the
block's output error. It is given lowbit's own calibration windows as its dataset (a list of
`{"input_ids", "attention_mask"}` batches, which its calibration loop iterates as is), so it downloads
nothing and sees the same tokens as lowbit's solvers.

AutoRound leaves each tuned linear holding its quantize-dequantized weight (in its bfloat16 compute dtype
on CPU) next to the float16 `scale` and the `zp` it would export. The dense weight handed back is rebuilt
from those: codes = round(w / scale) + zp, checked to be integers within the code range, then
(codes - zp) * scale in float32 -- exactly what its exported checkpoint dequantizes to.

The number of tuning iterations is AutoRound's own default unless LOWBIT_AUTOROUND_ITERS says otherwise
(short proof runs); it is part of the cell's settings, hence of its cache key and report.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import inspect
import os
import time
from typing import Any

import torch
from torch import nn

from lowbit.compare.grid import Scheme
from lowbit.compare.peers.base import Peer, PeerError, PeerJob, PeerResult, integer_bits_per_weight, register_peer

ITERS_VARIABLE = "LOWBIT_AUTOROUND_ITERS"
BATCH_SIZE = 8
"""AutoRound's own default calibration batch size."""
SEED = 42
"""AutoRound's own default seed."""
CODE_TOLERANCE = 0.1
"""How far w / scale + zp may sit from an integer: its bfloat16 weight rounds the product, never by half a step."""


@register_peer
class AutoRoundPeer(Peer):
    name = "autoround"
    tool = "auto-round"

    def __init__(self, iters: int | None = None) -> None:
        self._iters = iters

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("auto_round") is None:
            return "auto-round is not installed (pip install auto-round, or pip install 'lowbit[peers]')"
        return None

    def unsupported(self, scheme: Scheme) -> str | None:
        if scheme.group_size == 0:
            return "AutoRound has no per-tensor scheme; use a group size or -1 (per channel)"
        if not 2 <= scheme.bits <= 8:
            return f"AutoRound's integer schemes take 2 to 8 bits, not {scheme.bits}"
        return None

    def iters(self) -> int:
        """Tuning iterations per block: the constructor's, else $LOWBIT_AUTOROUND_ITERS, else AutoRound's default."""
        if self._iters is not None:
            return self._iters
        configured = os.environ.get(ITERS_VARIABLE)
        if configured:
            if not configured.isdigit():
                raise ValueError(f"{ITERS_VARIABLE}={configured!r} must be a non-negative integer")
            return int(configured)
        from auto_round import SignRoundConfig

        return inspect.signature(SignRoundConfig.__init__).parameters["iters"].default

    def settings(self, scheme: Scheme) -> dict[str, Any]:
        return {"algorithm": "signround", "bits": scheme.bits, "group_size": scheme.group_size,
                "sym": scheme.symmetric, "data_type": "int", "iters": self.iters(), "batch_size": BATCH_SIZE,
                "seed": SEED, "ignore": ["lm_head"], "version": _version()}

    def quantize(self, job: PeerJob) -> PeerResult:
        from auto_round import AutoRound, SignRoundConfig

        if job.calibration is None:
            raise PeerError("AutoRound needs calibration data; pass --calib")
        if job.tokenizer is None:
            raise PeerError("AutoRound needs the model's tokenizer")
        model = copy.deepcopy(job.model)  # AutoRound rewrites weights and dtypes in place
        windows = job.calibration.to(torch.int64)
        dataset = [{"input_ids": window[None], "attention_mask": torch.ones(1, windows.shape[1], dtype=torch.long)}
                   for window in windows]
        scheme = {"bits": job.scheme.bits, "group_size": job.scheme.group_size, "sym": job.scheme.symmetric,
                  "data_type": "int"}
        start = time.perf_counter()
        try:
            compressor = AutoRound(
                model, tokenizer=job.tokenizer, scheme=scheme, alg_configs=SignRoundConfig(iters=self.iters()),
                dataset=dataset, nsamples=len(dataset), seqlen=windows.shape[1], batch_size=BATCH_SIZE,
                seed=SEED, device_map=0 if torch.cuda.is_available() else "cpu")
            quantized, _ = compressor.quantize()
        except SystemExit as err:  # its calibration loop exits the process when no window fits
            raise PeerError(f"AutoRound stopped (exit {err.code}); see its log above") from None
        seconds = time.perf_counter() - start
        state: dict[str, torch.Tensor] = {}
        for name in job.linear_names:
            state[f"{name}.weight"] = dequantized_weight(quantized.get_submodule(name), job.scheme, name).to(
                job.model.get_submodule(name).weight.dtype)
        tuned = {name for name, module in quantized.named_modules() if isinstance(module, nn.Linear)
                 and torch.is_tensor(getattr(module, "scale", None))}
        if tuned != set(job.linear_names):
            raise PeerError(f"AutoRound quantized other layers than lowbit: only it {sorted(tuned - set(job.linear_names))[:3]}, "
                            f"only lowbit {sorted(set(job.linear_names) - tuned)[:3]}")
        shapes = [job.model.get_submodule(name).weight.shape for name in job.linear_names]
        return PeerResult(
            state=state,
            bits_per_weight=integer_bits_per_weight(shapes, job.scheme),
            seconds=seconds,
            version=_version(),
            settings={**self.settings(job.scheme), "nsamples": len(dataset), "seqlen": int(windows.shape[1]),
                      "storage": "codes + float16 scale per group, zero point at the code width (as its export)"},
        )


def dequantized_weight(linear: nn.Module, scheme: Scheme, name: str) -> torch.Tensor:
    """The float32 weight AutoRound's export of `linear` dequantizes to, from its tuned weight, scale and zp."""
    scale = getattr(linear, "scale", None)
    if not torch.is_tensor(scale):
        raise PeerError(f"AutoRound left no scale on {name}: it did not quantize it")
    weight = linear.weight.detach().float()
    rows, columns = weight.shape
    scale = scale.detach().float().reshape(rows, -1)
    zero = torch.as_tensor(linear.zp, dtype=torch.float32).reshape(-1)
    zero = zero.expand(rows * scale.shape[1]).reshape(rows, -1) if zero.numel() == 1 else zero.reshape(rows, -1)
    groups = scale.shape[1]
    if columns % groups:
        raise PeerError(f"AutoRound's {groups} groups do not divide {name}'s {columns} columns")
    grouped = weight.reshape(rows, groups, columns // groups)
    raw = grouped / scale[..., None] + zero[..., None]
    codes = raw.round()
    if (raw - codes).abs().max() > CODE_TOLERANCE or codes.min() < 0 or codes.max() > 2 ** scheme.bits - 1:
        raise PeerError(f"AutoRound's weight of {name} is not on its {scheme.bits}-bit grid")
    return ((codes - zero[..., None]) * scale[..., None]).reshape(rows, columns)


def _version() -> str:
    try:
        return importlib.metadata.version("auto-round")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
