"""Small Triton kernels that run one @triton.jit helper of lowbit's kernels on its own, so a test can
check it value by value (in Triton's interpreter on CPU). Imported only where Triton is installed."""

import triton
import triton.language as tl

from lowbit.kernels.int4_unpack import paired_codes


@triton.jit
def paired_codes_probe(words_ptr, out_ptr, N: tl.constexpr, J: tl.constexpr, DTYPE: tl.constexpr):
    """out[0, n], out[1, n] = `paired_codes`'s two values for words[n], as float32."""
    offs = tl.arange(0, N)
    low, high = paired_codes(tl.load(words_ptr + offs)[None, :], J, DTYPE)
    tl.store(out_ptr + offs, tl.reshape(low, (N,)).to(tl.float32))
    tl.store(out_ptr + N + offs, tl.reshape(high, (N,)).to(tl.float32))
