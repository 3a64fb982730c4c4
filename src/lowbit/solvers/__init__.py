"""Solvers choose the stored values of one weight matrix. Importing this package registers them all."""

from lowbit.solvers import awq, binary, easyquant, gptq, hqq, rtn, squeezellm, vq  # noqa: F401  (registration side effect)
from lowbit.solvers.base import SOLVERS, Solver, register_solver

__all__ = ["SOLVERS", "Solver", "register_solver"]
