"""Lookup-table formats (NF4, learned per-row tables), the SqueezeLLM solver, and every non-integer
format under GPTQ and RTN."""

from __future__ import annotations

import pytest
import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats import FAMILIES, FormatError, LookupFormat, quantize_matrix
from lowbit.formats.lookup import NF4_TABLE, nf4_format, weighted_kmeans_rows
from lowbit.recipes import PRESETS, Recipe
from lowbit.solvers import SOLVERS
from lowbit.solvers.gptq import GPTQ, layer_output_error
from lowbit.solvers.rtn import RTN
from lowbit.solvers.squeezellm import SqueezeLLM
from tests.test_gptq import activation_like_problem


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_nf4_table_is_qlora_s():
    assert NF4_TABLE.shape == (16,) and NF4_TABLE[0] == -1 and NF4_TABLE[7] == 0 and NF4_TABLE[15] == 1
    assert torch.all(NF4_TABLE[1:] > NF4_TABLE[:-1])


def test_nf4_matches_nearest_value_reference():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    q = quantize_matrix(nf4_format(64), w)
    for g in range(2):
        block = w[:, 64 * g : 64 * (g + 1)]
        scale = block.abs().amax(dim=1, keepdim=True).to(torch.float16).float()
        assert torch.equal(q.scale[:, g : g + 1].float(), scale)
        distance = (block.unsqueeze(-1) / scale.unsqueeze(-1) - NF4_TABLE).abs()
        assert torch.equal(q.codes[:, 64 * g : 64 * (g + 1)].long(), distance.argmin(dim=-1))
    assert torch.equal(q.dequantize(), NF4_TABLE[q.codes.long()] * q.scale.float().repeat_interleave(64, dim=1))
    assert q.bits_per_weight() == 4 + 16 / 64


def slow_weighted_kmeans(x: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Textbook Lloyd iterations on one row, in float64, from the given start, until nothing moves."""
    x, weights, c = x.double(), weights.double(), centroids.double().clone()
    for _ in range(100):
        assign = (x.unsqueeze(1) - c.unsqueeze(0)).abs().argmin(dim=1)
        new = c.clone()
        for k in range(len(c)):
            members = assign == k
            if weights[members].sum() > 0:
                new[k] = (weights[members] * x[members]).sum() / weights[members].sum()
        if torch.allclose(new, c, atol=0, rtol=0):
            break
        c = new.sort().values
    return c


def test_weighted_kmeans_matches_textbook():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 200, generator=g, dtype=torch.float64)
    weights = torch.rand(200, generator=g, dtype=torch.float64) ** 3
    fast = weighted_kmeans_rows(x, weights, 8)
    start = torch.quantile(x, torch.linspace(0, 1, 8, dtype=torch.float64), dim=1).T
    for r in range(5):
        torch.testing.assert_close(fast[r], slow_weighted_kmeans(x[r], weights, start[r]), rtol=0, atol=1e-12)


def test_learned_tables_follow_importance():
    """A column with overwhelming importance is reproduced almost exactly; uniform weights are not."""
    torch.manual_seed(0)
    w = torch.randn(16, 96)
    importance = torch.ones(96)
    importance[5] = 1e6
    fmt = LookupFormat(bits=3, group_size=-1, learned=True)
    weighted = quantize_matrix(fmt, w, importance=importance).dequantize()
    plain = quantize_matrix(fmt, w).dequantize()
    assert (weighted[:, 5] - w[:, 5]).abs().max() < 1e-3 * w.abs().max()
    assert (plain[:, 5] - w[:, 5]).abs().mean() > 10 * (weighted[:, 5] - w[:, 5]).abs().mean()


def test_learned_tables_are_stored_exactly_and_counted():
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    q = quantize_matrix(LookupFormat(bits=4, group_size=-1, learned=True), w)
    table = q.format.table
    assert table.shape == (6, 16) and torch.equal(table.half().float(), table)
    assert torch.all(table[:, 1:] >= table[:, :-1])
    assert q.bits_per_weight() == 4 + (16 + 16 * 16) / 64
    # Each weight decodes to its row's nearest table value times the row scale.
    nearest = (w.unsqueeze(-1) / q.scale.float().unsqueeze(-1) - table.unsqueeze(1)).abs().argmin(-1)
    assert torch.equal(q.codes.long(), nearest)
    with pytest.raises(FormatError, match="rows"):
        q.format.prepare(torch.randn(7, 64))


def test_lookup_settings_are_checked():
    with pytest.raises(FormatError, match="bits=4"):
        LookupFormat(bits=3, learned=False)
    with pytest.raises(FormatError, match="prepare"):
        LookupFormat(bits=4, learned=True).encode(torch.randn(2, 4), LookupFormat().fit(torch.randn(2, 4)))


# --- solvers on every format -----------------------------------------------------------------------

FORMATS = {name: Recipe(format=name, bits=FAMILIES[name].bits[0], group_size=FAMILIES[name].group_size)
           for name in FAMILIES if name != "int" and FAMILIES[name].methods is None}  # vq has its own solver


@pytest.mark.parametrize("name", list(FORMATS))
def test_gptq_with_an_identity_hessian_is_rtn(name):
    """With uncorrelated unit inputs GPTQ has nothing to propagate: it must equal round-to-nearest."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    stats = HessianStats(64)
    stats.sum_outer = torch.eye(64) / 2
    stats.tokens = 1
    fmt = FORMATS[name].format_for(64)
    gptq = GPTQ(damp=0.0).solve(w, fmt, stats)
    rtn = RTN().solve(w, fmt)
    assert torch.equal(gptq.codes, rtn.codes)
    assert torch.equal(gptq.dequantize(), rtn.dequantize())


@pytest.mark.parametrize("name", list(FORMATS))
def test_gptq_reduces_output_error(name):
    w, stats = activation_like_problem(seed=3, rows=48, columns=96, tokens=384)
    fmt = FORMATS[name].format_for(96)
    H = stats.hessian
    gptq = layer_output_error(w, GPTQ().solve(w, fmt, stats).dequantize(), H)
    rtn = layer_output_error(w, RTN().solve(w, fmt).dequantize(), H)
    assert gptq < 0.8 * rtn


@pytest.mark.parametrize("name", list(FORMATS))
def test_rtn_clip_search_never_hurts(name):
    w, _ = activation_like_problem(seed=4, rows=16, columns=64, tokens=64)
    fmt = FORMATS[name].format_for(64)
    if not fmt.clippable:
        with pytest.raises(FormatError, match="drop --clip-search"):
            RTN(clip_search=True).solve(w, fmt)
        return
    plain = (RTN().solve(w, fmt).dequantize() - w).abs().pow(2.4).sum()
    clipped = (RTN(clip_search=True).solve(w, fmt).dequantize() - w).abs().pow(2.4).sum()
    assert clipped <= plain


def test_squeezellm_beats_unweighted_tables():
    w, stats = activation_like_problem(seed=5, rows=48, columns=96, tokens=384)
    fmt = LookupFormat(bits=3, group_size=-1, learned=True)
    H = stats.hessian
    weighted = layer_output_error(w, SqueezeLLM().solve(w, fmt, stats).dequantize(), H)
    plain = layer_output_error(w, RTN().solve(w, fmt).dequantize(), H)
    assert weighted < 0.9 * plain
    assert SOLVERS["squeezellm"] is SqueezeLLM


def test_squeezellm_needs_learned_tables_and_statistics():
    w, stats = activation_like_problem(seed=5, rows=4, columns=32, tokens=64)
    with pytest.raises(FormatError, match="--format lut"):
        SqueezeLLM().solve(w, nf4_format(32), stats)
    with pytest.raises(ValueError, match="calibration"):
        SqueezeLLM().solve(w, LookupFormat(bits=3, group_size=-1, learned=True), None)


# --- recipes --------------------------------------------------------------------------------------


def test_recipe_format_defaults_to_int_and_round_trips(tmp_path):
    assert Recipe().format == "int"
    recipe = Recipe(method="squeezellm", format="lut", bits=3, group_size=-1)
    recipe.save(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == recipe
    assert recipe.describe() == "squeezellm lut3 per-channel"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(format="fp8_e4m3", bits=4), "8-bit codes"),
        (dict(format="nvfp4", bits=4, group_size=32), "blocks of 16"),
        (dict(format="mxfp4", bits=4, symmetric=False), "symmetric"),
        (dict(format="fp6"), "unknown format"),
    ],
)
def test_recipe_refuses_fields_the_format_cannot_hold(fields, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**fields)


@pytest.mark.parametrize("name, kind", [("fp8", "FloatFormat"), ("nvfp4", "NVFP4Format"),
                                        ("mxfp4", "MXFormat"), ("nf4", "LookupFormat")])
def test_presets_build_their_formats(name, kind):
    fmt = PRESETS[name].format_for(576)
    assert type(fmt).__name__ == kind
