"""The TMA-fed tile with its words swizzled (128 bytes) and its scales loaded by plain loads (round 16):
ten launches a config checked against float64, then timed beside bf16, the dispatcher and the
register-fed tile at two programs an SM; each config again with every partition given the same
registers (EVEN_REGISTERS), in case the register reallocation between partitions was at fault; or,
with --flag LATE_FREE, each config again with the raw buffer freed only after its words were used.

    python benchmarks/gpu_ws_wgmma_tma_check.py | tee benchmarks/results/gpu_ws_wgmma_tma_check_h200.log
    python benchmarks/gpu_ws_wgmma_tma_check.py --flag LATE_FREE | tee benchmarks/results/gpu_ws_wgmma_tma_late_free_h200.log
    python benchmarks/gpu_ws_wgmma_tma_check.py --flag LATE_FREE --scales-by-tma | tee \
        benchmarks/results/gpu_ws_wgmma_tma_late_free_scales_h200.log
"""
import argparse
import sys, torch
sys.path.insert(0, "benchmarks")
import gpu_ws_wgmma as w
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms
from lowbit.kernels import w4a16
T, C = w.TmaConfig, w.Config
parser = argparse.ArgumentParser()
parser.add_argument("--flag", default="EVEN_REGISTERS", choices=["EVEN_REGISTERS", "LATE_FREE"],
                    help="the kernel flag each config is run with again")
parser.add_argument("--scales-by-tma", action="store_true", help="scales and zeros by TMA too (plain loads by default)")
args = parser.parse_args()
flag, scales_by_tma = args.flag, args.scales_by_tma
label = flag.lower().replace("_", " ")
tma = [T(128, 128, 2048, 2, 8, 1), T(128, 128, 2048, 3, 4, 1), T(128, 64, 1024, 3, 8, 1), T(128, 64, 2048, 2, 8, 1),
       T(128, 64, 1024, 2, 8, 2), T(128, 128, 1024, 3, 8, 2), T(128, 64, 2048, 3, 8, 2)]
for n in (14336, 4096):
    torch.manual_seed(0)
    qw = quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128), torch.randn(n, 4096, device="cuda"))
    packed = pack_quantized_weight(qw)
    deq = qw.dequantize().double()
    dense = qw.dequantize().to(torch.bfloat16)
    for m in (16, 64):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ deq.T
        print(f"N={n} M={m} bf16 {1000 * graph_time_ms(lambda: x @ dense.T):.1f} us, dispatcher "
              f"{1000 * graph_time_ms(lambda: w4a16.w4a16_matmul(x, packed)):.1f} us ({w4a16.chosen_path(x, packed)})",
              flush=True)
        runs = [("reg 2/SM", lambda: w.launch(x, packed, C(128, 128, 2048, 2, True), True, 0))]
        runs += [(f"tma {tuple(c)}", lambda c=c: w.tma_launch(x, packed, c, SCALES_BY_TMA=scales_by_tma)) for c in tma]
        runs += [(f"tma {label} {tuple(c)}", lambda c=c: w.tma_launch(x, packed, c, SCALES_BY_TMA=scales_by_tma,
                                                                       **{flag: True}))
                 for c in tma]
        for name, call in runs:
            errs = []
            for _ in range(10):
                out = call()
                torch.cuda.synchronize()
                errs.append(float((out.double() - ref).norm() / ref.norm()))
            print(f"  {name}: max error {max(errs):.2e} bad {sum(e > 5e-3 for e in errs)}/10, "
                  f"{1000 * graph_time_ms(call):.1f} us", flush=True)
