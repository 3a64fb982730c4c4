"""`lowbit bench kernels`: the W4A16 kernel against bf16 cuBLAS and torch's int4 kernel.

For each linear shape of Llama-3-8B / 70B and each batch M, on the same GPU in one process:
  * bf16: F.linear with the dequantized weight in bf16 (cuBLAS);
  * torch int4: `aten._weight_int4pack_mm` (tinygemm), group 128, on the same codes;
  * lowbit sym / asym: `w4a16_matmul` with the PackedInt4 layout, i.e. the dispatcher's measured
    choice among lowbit's fused Triton kernels, dequantize-then-cuBLAS (M > 64), GemLite's kernels
    and FBGEMM's CUTLASS kernel (each when installed); the table names the path. For the
    asymmetric weight the fused kernels, GemLite and FBGEMM are also timed on their own, so the
    choice can be checked;
  * the int4 roofline: the bytes an asymmetric matmul must move (4-bit codes, scales, zero points
    at one byte each, x, y) over the device-to-device copy bandwidth measured at the start of the
    run. The zero points count one byte whatever the layout holds (it keeps them in the scales'
    dtype, int4_pack.py), so a layout's choice does not move the bar it is measured against.
Times come from CUDA graph replays of back-to-back calls, each call on its own copy of the weight
(the copies together at least ROTATE_BYTES, five times an H100's L2): launch overhead stays out, as
in a graph-captured decode loop, and every call reads its weight from device memory. Every
lowbit result is first checked against float64 dequantize-then-matmul (relative error < 1e-2, the
bound for bf16 operands).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import triton_available, w4a16_matmul
from lowbit.kernels.int4_pack import PackedInt4, pack_quantized_weight
from lowbit.kernels.timing import graph_replay_ms
from lowbit.kernels.w4a16 import chosen_path, path_matmuls, use_paths

SHAPES: dict[str, tuple[int, int]] = {  # name: (N = out_features, K = in_features)
    "8B q/o_proj": (4096, 4096),
    "8B k/v_proj": (1024, 4096),
    "8B gate/up_proj": (14336, 4096),
    "8B down_proj": (4096, 14336),
    "70B q/o_proj": (8192, 8192),
    "70B k/v_proj": (1024, 8192),
    "70B gate/up_proj": (28672, 8192),
    "70B down_proj": (8192, 28672),
}
M_VALUES = (1, 16, 64, 256)
MAX_RELATIVE_ERROR = 1e-2
ROTATE_BYTES = 256 << 20


class BenchError(ValueError):
    """The benchmark cannot run here (no GPU, unknown shape); the message says what is missing."""


def _median_us(fn) -> float:
    import triton

    fn()
    torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _graph_us(calls: list) -> float:
    """Median microseconds per call of `calls` (zero-argument functions) replayed as one CUDA graph."""
    for call in calls:
        call()  # warm up: compile and autotune outside the graph
    torch.cuda.synchronize()
    return 1e3 * graph_replay_ms(calls, replays=15) / len(calls)


def _copies(nbytes: int) -> int:
    return max(2, -(-ROTATE_BYTES // nbytes))


def rotated_us(call: Callable[[object], object], weights, nbytes: int) -> float:
    """Median microseconds per `call(w)` replayed as one CUDA graph, each call on its own copy `w`
    of `weights` (a tensor, a PackedInt4 or a tuple of them; `nbytes` one copy's size), so that
    every call reads its weight from device memory (the module docstring's method)."""
    copies = [weights] + [_clone(weights) for _ in range(_copies(nbytes) - 1)]
    return _graph_us([lambda w=w: call(w) for w in copies])


def _clone(value):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, PackedInt4):
        return PackedInt4(value.qweight.clone(), value.scales.clone(), None if value.zeros is None else value.zeros.clone(),
                          value.group_size, value.in_features, value.out_features, value.input_perm)
    return tuple(_clone(v) for v in value)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written), over 1 GiB."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    seconds = _median_us(lambda: dst.copy_(src)) / 1e6
    return 2 * src.numel() * 4 / seconds


def _torch_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int):
    """tinygemm operands for the same codes, or None when this torch build lacks the CUDA kernel."""
    try:
        nibbles = codes.to(torch.int32)
        packed_bytes = ((nibbles[:, ::2] << 4) | nibbles[:, 1::2]).to(torch.uint8)
        weight = torch.ops.aten._convert_weight_to_int4pack(packed_bytes, 8)
        # tinygemm computes (code - 8) * scale + zero_term; zero_term = (8 - zero) * scale is the same grid.
        scale_t = scale.float().T
        zero_term = (8 - zero.float().T) * scale_t
        scales_and_zeros = torch.stack([scale_t, zero_term], dim=2).to(torch.bfloat16).contiguous()
        return weight, scales_and_zeros
    except (RuntimeError, NotImplementedError):
        return None


def _gemlite_version() -> str | None:
    """GemLite's version, also when its source is on PYTHONPATH without package metadata (as carried)."""
    from lowbit.kernels import w4a16_gemlite

    return __import__("gemlite").__version__ if w4a16_gemlite.available() else None


def _fbgemm_version() -> str:
    """fbgemm-gpu-genai's version, or why it cannot be used here (a wheel built for another torch)."""
    from lowbit.kernels import w4a16_fbgemm

    return w4a16_fbgemm.version() or f"not usable ({w4a16_fbgemm.import_error()})"


def _lowbit_config(path: str, m: int, packed: PackedInt4) -> str | None:
    """The tile config of lowbit's kernel on this path: a Gluon kernel's where that was chosen,
    else the fused Triton kernels' (also timed on their own beside any other path)."""
    from lowbit.kernels import w4a16_gluon, w4a16_gluon_gemv
    from lowbit.kernels.w4a16_triton import tuned_config

    if path == "gluon":
        return w4a16_gluon.tuned_config(packed, m)
    return w4a16_gluon_gemv.tuned_config(packed) if path == "gluon-gemv" else tuned_config(m, packed)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def run(shapes: list[str] | None = None, m_values: tuple[int, ...] = M_VALUES, group_size: int = 128,
        paths: tuple[str, ...] = ()) -> dict:
    """Time every shape at every M; returns {"meta": ..., "rows": [...]} (times in microseconds).

    `paths` narrows what the dispatcher may choose among (kernels.w4a16.use_paths; empty: all).
    """
    if not triton_available():
        raise BenchError("lowbit bench kernels needs a CUDA GPU and Triton; neither was found here")
    names = shapes or list(SHAPES)
    unknown = [name for name in names if name not in SHAPES]
    if unknown:
        raise BenchError(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")

    use_paths(*paths)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    rows = []
    for name in names:
        n, k = SHAPES[name]
        weight = torch.randn(n, k, device="cuda")
        packed: dict[str, PackedInt4] = {}
        dense = None
        int4 = None
        for kind, symmetric in (("sym", True), ("asym", False)):
            qweight = quantize_matrix(IntegerFormat(4, symmetric=symmetric, group_size=group_size), weight)
            packed[kind] = pack_quantized_weight(qweight)
            if not symmetric:
                dense = qweight.dequantize().to(torch.bfloat16)
                int4 = _torch_int4(qweight.codes, qweight.scale, qweight.zero, group_size)
            del qweight
        del weight
        for m in m_values:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": name, "N": n, "K": k, "M": m}
            for kind, weights in packed.items():
                ref = x.double() @ weights.dequantize().double().T
                calls = {"lowbit": w4a16_matmul}
                if kind == "asym":  # lowbit's fused kernels and each other path on its own, the choice checked
                    calls.update({path: matmul for path, matmul in path_matmuls(m, weights, x.dtype).items()
                                  if path != "dequantize+cublas"})
                for path, matmul in calls.items():
                    label = f"{path}_{kind}"
                    row[f"rel_err_{label}"] = _relative_error(matmul(x, weights), ref)
                    if not row[f"rel_err_{label}"] < MAX_RELATIVE_ERROR:
                        raise BenchError(f"{name} M={m} {path} {kind}: relative error {row[f'rel_err_{label}']:.2e} "
                                         f"exceeds {MAX_RELATIVE_ERROR}; the kernel is wrong on this shape")
                    row[f"{label}_us"] = rotated_us(lambda w, f=matmul: f(x, w), weights, weights.nbytes())
                del ref
                row[f"path_{kind}"] = chosen_path(x, weights)
                row[f"config_{kind}"] = _lowbit_config(row[f"path_{kind}"], m, weights)
            row["bf16_us"] = rotated_us(lambda w: F.linear(x, w), dense, dense.numel() * 2)
            if int4 is not None:
                row["torch_int4_us"] = rotated_us(lambda w: torch.ops.aten._weight_int4pack_mm(x, w[0], group_size, w[1]),
                                                  int4, packed["asym"].nbytes())
            layout = packed["asym"]
            moved = (layout.qweight.numel() * 4 + layout.scales.numel() * layout.scales.element_size()
                     + layout.zeros.numel() + 2 * (x.numel() + m * n))
            row["roofline_us"] = 1e6 * moved / bandwidth
            rows.append(row)
        del packed, dense, int4
        torch.cuda.empty_cache()
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "group_size": group_size,
        "gemlite": _gemlite_version(),
        "fbgemm": _fbgemm_version(),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    return {"meta": meta, "rows": rows}


def markdown_table(result: dict) -> str:
    """The saved result as a markdown table plus the issue's targets, checked row by row."""
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"W4A16 matmul, int4 group {meta['group_size']}, on {meta['device']} (torch {meta['torch']}, "
        f"triton {meta['triton']}, gemlite {meta.get('gemlite') or 'not installed'}, "
        f"fbgemm-gpu-genai {meta.get('fbgemm') or 'not installed'}); measured copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s; "
        "times in microseconds per call (median of CUDA graph replays; each call reads its own weight copy "
        "from device memory). The gluon column is the Gluon GEMV at M = 1, the Gluon tensor-core tile above "
        "(16 rows up to 16, 32 up to 32, two 32-row tiles up to 64).",
        "",
        "| shape | N x K | M | bf16 cuBLAS | torch int4 | lowbit sym | lowbit asym | fused asym | gluon asym | "
        "gemlite asym | fbgemm asym | int4 roofline | bf16 / asym | torch int4 / asym | asym / roofline | "
        "rel. err (asym) | path (asym) | lowbit tile (asym) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    optional = lambda value: "n/a" if value is None else f"{value:.1f}"  # noqa: E731
    for r in rows:
        int4 = r.get("torch_int4_us")
        asym = r["lowbit_asym_us"]
        int4_ratio = "n/a" if int4 is None else f"{int4 / asym:.2f}x"
        lines.append(
            f"| {r['shape']} | {r['N']}x{r['K']} | {r['M']} | {r['bf16_us']:.1f} | "
            f"{optional(int4)} | {r['lowbit_sym_us']:.1f} | {asym:.1f} | {optional(r.get('fused_asym_us'))} | "
            f"{optional(r.get('gluon_asym_us', r.get('gluon-gemv_asym_us')))} | "
            f"{optional(r.get('gemlite_asym_us'))} | "
            f"{optional(r.get('fbgemm_asym_us'))} | {r['roofline_us']:.1f} | "
            f"{r['bf16_us'] / asym:.2f}x | {int4_ratio} | {asym / r['roofline_us']:.2f} | "
            f"{r.get('rel_err_lowbit_asym', r.get('rel_err_asym')):.1e} | "
            f"{r.get('path_asym', 'fused')} | {r.get('config_asym') or 'n/a'} |"
        )
    lines += ["", "Targets (issue 6), counted over the rows above for the asymmetric kernel:"]
    for label, ok in _targets(rows):
        lines.append(f"- {label}: {ok}")
    return "\n".join(lines) + "\n"


def _targets(rows: list[dict]) -> list[tuple[str, str]]:
    def count(selected, test) -> str:
        passed = sum(1 for r in selected if test(r))
        return f"{passed}/{len(selected)}"

    by_m = lambda ms: [r for r in rows if r["M"] in ms]  # noqa: E731
    return [
        ("M=1 at least 3x faster than bf16", count(by_m({1}), lambda r: r["bf16_us"] >= 3 * r["lowbit_asym_us"])),
        ("M=1 within 1.5x of the int4 roofline",
         count(by_m({1}), lambda r: r["lowbit_asym_us"] <= 1.5 * r["roofline_us"])),
        ("M=16 and M=64 at least 2x faster than bf16",
         count(by_m({16, 64}), lambda r: r["bf16_us"] >= 2 * r["lowbit_asym_us"])),
        ("M=256 no slower than bf16", count(by_m({256}), lambda r: r["lowbit_asym_us"] <= r["bf16_us"])),
        ("faster than torch int4 at every M",
         count([r for r in rows if "torch_int4_us" in r], lambda r: r["lowbit_asym_us"] < r["torch_int4_us"])),
    ]
