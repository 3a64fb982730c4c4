"""y = x Wᵀ for an int4 weight in the PackedInt4 layout: the dispatcher and the torch reference.

On GPU there are up to six ways to run the product: lowbit's fused Triton kernels
(w4a16_triton.py), its Gluon kernels on Hopper for M = 1 (w4a16_gluon_gemv.py) and for
2 <= M <= 64 (w4a16_gluon.py),
dequantize-then-cuBLAS (M > 64 only, where the matmul turns compute-bound), GemLite's kernels
when that package is installed (w4a16_gemlite.py), and FBGEMM's CUTLASS kernel when
fbgemm-gpu-genai is installed (w4a16_fbgemm.py). Which is fastest depends on the shape, M and the
GPU, so the first call for each (shape, M bucket, dtype) times every allowed path as a
graph-captured decode loop runs it (no launch cost, cold L2: timing.py) and keeps the fastest;
`path_table()` shows the choices and `use_paths()` narrows the candidates
(`lowbit bench kernels --paths`). Paths that keep their own copy of a weight (Gluon's shuffled
words, FBGEMM's) drop the timed weight's copy when no M bucket of its shape chose them, so
installing a library does not double the memory of every weight.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable
from typing import Literal

import torch

from lowbit.kernels.int4_pack import PackedInt4


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (the Triton path can run at all)."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


DECODE_MAX_M = 64
"""Largest M the split-K family handles; above it every output tile is written once, directly."""


def bucket(m: int) -> int:
    """The key for M under which paths are chosen and tiles tuned: 1, 16, 32, 64, then powers of
    two. 32 is a bucket of its own: from 17 to 32 rows the Gluon path runs one 32-row tile, from 33
    to 64 two (w4a16_gluon.tile_shape), so a choice timed at 24 rows does not hold at 48."""
    return 1 if m == 1 else 16 if m <= 16 else 32 if m <= 32 else 64 if m <= DECODE_MAX_M else 1 << (m - 1).bit_length()


MatmulPath = Literal["fused", "gluon-gemv", "gluon", "dequantize+cublas", "gemlite", "fbgemm"]
PATHS: tuple[MatmulPath, ...] = ("fused", "gluon-gemv", "gluon", "dequantize+cublas", "gemlite", "fbgemm")
_CHOSEN: dict[tuple, MatmulPath] = {}
_ALLOWED: set[str] = set(PATHS)


def path_table() -> dict[tuple, MatmulPath]:
    """The measured choices so far: (device, dtype, M bucket, N, K, group, symmetric) -> path."""
    return dict(_CHOSEN)


def chosen_path(x: torch.Tensor, packed: PackedInt4) -> MatmulPath:
    """The path the dispatcher runs for `x` and `packed`: the timed choice of their shape and M
    bucket, "fused" before one was made or where no other path could run."""
    return _CHOSEN.get(_choice_key(x, packed), "fused")


def _choice_key(x: torch.Tensor, packed: PackedInt4) -> tuple:
    return (x.device.index, x.dtype, bucket(x.shape[0]), packed.out_features, packed.in_features, packed.group_size,
            packed.symmetric)


def use_paths(*paths: str) -> None:
    """Let the dispatcher choose only among `paths` (default: all of PATHS); forgets earlier choices.

    "fused" always stays allowed: it is the path taken inside a CUDA graph capture before any
    choice was measured, and the only one that handles every supported shape.
    """
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown W4A16 path(s) {', '.join(sorted(unknown))}; choose from {', '.join(PATHS)}")
    _ALLOWED.clear()
    _ALLOWED.update(paths or PATHS)
    _ALLOWED.add("fused")
    _CHOSEN.clear()


def path_matmuls(m: int, packed: PackedInt4, dtype: torch.dtype) -> dict[MatmulPath, Callable]:
    """Every path that can run `packed` for M rows of `dtype` here, as matmul(x, packed) functions,
    whatever `use_paths` allows: the dispatcher's candidates, and what a benchmark times on its own."""
    from lowbit.kernels import w4a16_fbgemm, w4a16_gemlite, w4a16_gluon, w4a16_gluon_gemv, w4a16_triton

    matmuls: dict[MatmulPath, Callable] = {"fused": w4a16_triton.matmul}
    if m == 1 and w4a16_gluon_gemv.supports(packed, dtype):
        matmuls["gluon-gemv"] = w4a16_gluon_gemv.matmul
    if 1 < m <= w4a16_gluon.MAX_M and w4a16_gluon.supports(packed, dtype):
        matmuls["gluon"] = w4a16_gluon.matmul
    if m > DECODE_MAX_M:
        matmuls["dequantize+cublas"] = w4a16_triton.dequantize_matmul
    if w4a16_gemlite.supports(packed, dtype):
        matmuls["gemlite"] = w4a16_gemlite.matmul
    if w4a16_fbgemm.supports(packed, dtype):
        matmuls["fbgemm"] = w4a16_fbgemm.matmul
    return matmuls


def _candidates(x: torch.Tensor, packed: PackedInt4) -> dict[MatmulPath, Callable[[], torch.Tensor]]:
    return {path: functools.partial(matmul, x, packed)
            for path, matmul in path_matmuls(x.shape[0], packed, x.dtype).items() if path in _ALLOWED}


def _choose(x: torch.Tensor, packed: PackedInt4) -> tuple[MatmulPath, Callable[[], torch.Tensor]]:
    """The fastest allowed path for this shape and M bucket, timed once (graph replays, cold L2: timing.py)."""
    calls = _candidates(x, packed)
    key = _choice_key(x, packed)
    if key not in _CHOSEN:
        if len(calls) == 1 or torch.cuda.is_current_stream_capturing():
            return "fused", calls["fused"]  # nothing can be timed inside a graph capture; warm up outside it
        from lowbit.kernels.timing import graph_time_ms

        times = {}
        for path, call in calls.items():
            try:
                times[path] = graph_time_ms(call, x.device)
            except Exception as error:  # an optional path that cannot run here must not stop the product
                if path == "fused":
                    raise
                warnings.warn(f"W4A16 path {path!r} failed on a {packed.out_features}x{packed.in_features} weight "
                              f"and is not used for it: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}")
        _CHOSEN[key] = min(times, key=times.get)
        _release_unchosen_copies(key, calls, packed)
    path = _CHOSEN[key]
    return path, calls[path]


def _release_unchosen_copies(key: tuple, timed: dict, packed: PackedInt4) -> None:
    """Drop the copies of `packed` that timing built for paths no M bucket of its shape chose.

    Only the first weight of a shape and M bucket is timed; later weights of the shape build only
    the chosen paths' copies. The shape includes the activations' dtype, the one GemLite builds
    its copies for (Gluon's and FBGEMM's are for bf16 only)."""
    from lowbit.kernels import w4a16_fbgemm, w4a16_gemlite, w4a16_gluon

    shape = key[:2] + key[3:]
    chosen_for_shape = {path for k, path in _CHOSEN.items() if k[:2] + k[3:] == shape}
    releases = {"gluon": w4a16_gluon.release, "fbgemm": w4a16_fbgemm.release,
                "gemlite": functools.partial(w4a16_gemlite.release, dtype=key[1])}
    for path, release in releases.items():
        if path in timed and path not in chosen_for_shape:
            release(packed)


_PENDING: dict[tuple, torch.Tensor] = {}
"""One zeroed float32 buffer per (device, M, N): pending_matmul's products, each zeroed again by its reader."""


def pending_matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor | None:
    """x [..., K] @ Wᵀ left unfinished: its float32 sums [..., N], added into this shape's zeroed
    buffer by the chosen kernel without its split-K finish (the tile counter, its fence and the
    last program's read-back: 1.2-2.1 us of a GEMV on an H200's 8B shapes,
    gpu_gemv_anatomy_tail_h200.md). The kernel that reads the product next must round it to x's
    dtype, as the finish would have, and zero the buffer (decode_ops.Pending does both); until then
    no other product of the same shape may be asked for.

    None, launching nothing, where that cannot be done: off the Gluon paths (those the dispatcher
    chose for this shape and M bucket are the only ones that can leave a product pending), before a
    path is chosen, or where the buffer would first be made inside a graph capture. Then call
    w4a16_matmul."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and triton_available() and x.shape[-1] == packed.in_features):
        return None
    from lowbit.kernels import w4a16_gluon, w4a16_gluon_gemv

    leading = x.shape[:-1]
    x2 = x.reshape(-1, packed.in_features)
    if packed.input_perm is not None:
        x2 = x2.index_select(1, packed.input_perm)
    x2 = x2.contiguous()
    add_into = {"gluon-gemv": w4a16_gluon_gemv.add_into,
                "gluon": w4a16_gluon.add_into}.get(_CHOSEN.get(_choice_key(x2, packed)))
    key = (x.device.index, x2.shape[0], packed.out_features)
    if add_into is None or (key not in _PENDING and torch.cuda.is_current_stream_capturing()):
        return None
    if key not in _PENDING:
        _PENDING[key] = torch.zeros(x2.shape[0], packed.out_features, device=x.device, dtype=torch.float32)
    sums = _PENDING[key]
    if not add_into(x2, packed, sums):
        return None
    return sums.view(*leading, packed.out_features)


def reference_w4a16_matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """Dequantize to float32 and multiply in float32: the slow, obvious definition (any device).

    `x` is [..., K]; the result has x's dtype. Used on CPU and as the check for the Triton kernel.
    """
    weight = packed.dequantize().to(x.device)
    return (x.float() @ weight.T).to(x.dtype)


def w4a16_matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x [..., K] (bf16/fp16 on GPU, any float dtype on CPU) times the packed weight's transpose."""
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {packed.in_features}")
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and triton_available():
        from lowbit.kernels import w4a16_triton

        if w4a16_triton.supports(packed):
            leading = x.shape[:-1]
            x2 = x.reshape(-1, packed.in_features)
            if packed.input_perm is not None:
                x2 = x2.index_select(1, packed.input_perm)
            x2 = x2.contiguous()
            y = _choose(x2, packed)[1]()
            return y.reshape(*leading, packed.out_features)
    return reference_w4a16_matmul(x, packed)
