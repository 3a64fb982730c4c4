"""A Triton or Gluon kernel compiled ahead of time for sm_90 (Hopper) with Triton's own ptxas, no GPU needed.

The compile tests and benchmarks/gemv_sass.py read what a kernel becomes on Hopper from machines
without a GPU (CI's). Triton's JIT specialises each launch on the arguments it finds to be multiples
of 16 (pointers, sizes, strides on model shapes); an ahead-of-time compile must declare the same
ones aligned, or it builds the kernel with unvectorised loads and counts the wrong instructions.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable


def compile_for_sm90(kernel, types: dict[str, str], constexprs: dict, aligned: Iterable[str], options: dict):
    """`kernel` (a triton.jit or gluon.jit function) compiled for sm_90.

    `types`: the Triton type of each run-time argument ("*bf16", "fp32"...; "i32" where not named);
    `constexprs`: the compile-time arguments, those left out taking the kernel's defaults as a
    launch that omits them does; `aligned`: the arguments declared multiples of 16; `options`: the
    launch options (num_warps, num_stages)."""
    import triton
    from triton.backends.compiler import GPUTarget

    if hasattr(kernel, "is_gluon") and kernel.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource as Source
    else:
        from triton.compiler import ASTSource as Source
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    constexprs = {**defaults, **constexprs}
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in names}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned if name in names}
    return triton.compile(Source(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)
