"""Which of the TMA-fed tile's copies goes wrong (round 16): its scales and zeros, or x, loaded by
plain loads instead (SCALES_BY_TMA, X_BY_TMA), twenty launches a case, the words unswizzled in shared
memory as they were when this ran.

    python benchmarks/gpu_ws_wgmma_tma_flags.py | tee benchmarks/results/gpu_ws_wgmma_tma_flags_h200.log
"""
import sys, torch
sys.path.insert(0, "benchmarks")
import gpu_ws_wgmma as w
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels.int4_pack import pack_quantized_weight
T = w.TmaConfig
w.WORDS_SWIZZLE = 0
for n in (4096, 14336):
    torch.manual_seed(0)
    qw = quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128), torch.randn(n, 4096, device="cuda"))
    packed = pack_quantized_weight(qw)
    deq = qw.dequantize().double()
    for m in (16, 64):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ deq.T
        for cfg in (T(128, 128, 2048, 2, 8, 1), T(128, 64, 1024, 2, 8, 2), T(128, 64, 1024, 2, 8, 1)):
            for flags in ({}, {"SCALES_BY_TMA": False}, {"X_BY_TMA": False}, {"SCALES_BY_TMA": False, "X_BY_TMA": False}):
                errs = []
                for _ in range(20):
                    out = w.tma_launch(x, packed, cfg, **flags)
                    torch.cuda.synchronize()
                    errs.append(float((out.double() - ref).norm() / ref.norm()))
                print(f"N={n} M={m} {tuple(cfg)} {flags}: max {max(errs):.2e} first {errs[0]:.2e} "
                      f"bad {sum(e > 5e-3 for e in errs)}/20", flush=True)
