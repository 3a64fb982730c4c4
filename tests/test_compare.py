"""`lowbit compare`: grid building, Pareto fronts, the cell cache, outputs, peers and the CLI."""

from __future__ import annotations

import csv
import itertools
import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.compare.cache import CellCache, cell_key, model_fingerprint, tensor_digest
from lowbit.compare.grid import GridError, Scheme, build_cells, build_recipes, parse_axis, peer_cells
from lowbit.compare.pareto import pareto_front
from lowbit.compare.peers import expand_peer_names
from lowbit.compare.peers.base import integer_bits_per_weight
from tests.conftest import tiny_llama

# ---- Pareto front ---------------------------------------------------------------------------------


def dominated_reference(points: list[tuple[float, float]]) -> list[int]:
    """O(n²) definition: not dominated by any point that is <= in both and < in one; finite only."""
    finite = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    front = []
    for i in finite:
        x, y = points[i]
        if not any(points[j][0] <= x and points[j][1] <= y and points[j] != points[i] for j in finite):
            front.append(i)
    return sorted(front)


def test_pareto_front_hand_example():
    points = [(4.3, 20.0), (3.3, 36.0), (2.6, 300.0), (4.3, 21.7), (3.3, 50.0), (4.6, 19.6), (5.0, 25.0)]
    assert pareto_front(points) == [2, 1, 0, 5]


def test_pareto_front_matches_the_definition_on_random_points_with_ties_and_nans():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(0, 25)
        points = [(float(rng.randint(0, 6)), float(rng.randint(0, 6))) for _ in range(n)]
        if n and trial % 3 == 0:
            points[rng.randrange(n)] = (2.0, math.nan)
            points[rng.randrange(n)] = (math.inf, 1.0)
        assert sorted(pareto_front(points)) == dominated_reference(points), points


def test_pareto_front_keeps_equal_points_together():
    assert sorted(pareto_front([(1.0, 1.0), (1.0, 1.0), (2.0, 2.0)])) == [0, 1]


# ---- grid ------------------------------------------------------------------------------------------


def test_grid_is_the_product_of_axes_and_any_recipe_field_is_an_axis():
    field, values = parse_axis("method_options={damp: 0.01},{damp: 0.1}")
    assert field == "method_options" and values == [{"damp": 0.01}, {"damp": 0.1}]
    recipes = build_recipes({"method": ["gptq"], "bits": [2, 4], "group_size": [64, -1], field: values})
    assert len(recipes) == 8
    assert {(r.bits, r.group_size, r.method_options["damp"]) for r in recipes} == set(
        itertools.product([2, 4], [64, -1], [0.01, 0.1]))
    field, values = parse_axis("scale_dtype=float16,bfloat16")
    assert [r.scale_dtype for r in build_recipes({field: values})] == ["float16", "bfloat16"]


def test_grid_methods_come_from_the_solver_registry(monkeypatch):
    from lowbit.solvers import SOLVERS
    from lowbit.solvers.rtn import RTN

    class Other(RTN):
        name = "other-method"

    monkeypatch.setitem(SOLVERS, "other-method", Other)
    assert [r.method for r in build_recipes({"method": ["rtn", "other-method"]})] == ["rtn", "other-method"]


@pytest.mark.parametrize("axes, message", [
    ({"method": ["rtn", "nope"]}, r"method='nope'.*unknown method 'nope'; available: .*gptq.*rtn"),
    ({"bits": [4, 1]}, r"bits=1"),
    ({"method": ["rtn"], "method_options": [{"damp": 0.1}]}, r"bad option for method 'rtn'"),
    ({"bits": []}, r"axis 'bits' has no values"),
])
def test_invalid_grid_cells_are_refused_before_any_work(axes, message):
    with pytest.raises(GridError, match=message):
        build_recipes(axes)


def test_bad_axis_specs():
    with pytest.raises(GridError, match="unknown recipe field 'colour'"):
        parse_axis("colour=red")
    with pytest.raises(GridError, match="FIELD=VALUE1,VALUE2"):
        parse_axis("bits")


def test_peers_get_one_cell_per_distinct_scheme():
    recipes = build_recipes({"method": ["rtn", "gptq"], "bits": [3, 4], "group_size": [64, "auto"],
                             "symmetric": [False]})
    cells = peer_cells(recipes, ["hqq"])
    assert [c.scheme for c in cells] == [Scheme(3, 64, False), Scheme(4, 64, False)]  # "auto" has no peer form
    assert len(build_cells({"bits": [4], "group_size": [64]}, ["hqq", "llmcompressor-gptq"])) == 3
    assert expand_peer_names(["llmcompressor", "hqq"]) == ["llmcompressor-gptq", "llmcompressor-awq", "hqq"]
    with pytest.raises(ValueError, match="unknown peer 'gguf'"):
        expand_peer_names(["gguf"])


def test_peer_bits_per_weight_counts_like_the_integer_format():
    from lowbit.formats.integer import IntegerFormat

    for bits, group, symmetric in [(4, 64, False), (3, 32, True), (2, -1, False)]:
        expected = IntegerFormat(bits=bits, symmetric=symmetric, group_size=group).bits_per_weight(96, 128)
        got = integer_bits_per_weight([torch.Size([96, 128])], Scheme(bits, group, symmetric))
        assert got == pytest.approx(expected)


# ---- cache -----------------------------------------------------------------------------------------


def test_cache_round_trip_and_keys(tmp_path):
    cache = CellCache(tmp_path / "cells")
    assert cache.get("k") is None
    cache.put("k", {"perplexity": 1.5})
    assert cache.get("k") == {"perplexity": 1.5}
    assert list((tmp_path / "cells").iterdir()) == [tmp_path / "cells" / "k.json"]  # no temporary left
    assert cell_key({"a": 1, "b": [2]}) == cell_key({"b": [2], "a": 1})
    assert cell_key({"a": 1}) != cell_key({"a": 2})
    assert tensor_digest(torch.arange(4)) != tensor_digest(torch.arange(4).to(torch.int32))


def test_model_fingerprint_sees_a_changed_weight():
    model = tiny_llama()
    before = model_fingerprint(model)
    assert model_fingerprint(tiny_llama()) == before
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != before


# ---- a 2x2 grid on a tiny model, through the CLI ---------------------------------------------------


@pytest.fixture(scope="module")
def texts(wikitext, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("texts")
    calib, test = folder / "calib.txt", folder / "test.txt"
    calib.write_text((wikitext / "valid.txt").read_text()[:60_000])
    test.write_text((wikitext / "test.txt").read_text()[:30_000])
    return {"calib": str(calib), "data": str(test)}


def compare(model_dir: Path, texts: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["compare", str(model_dir), "--methods", "rtn,gptq", "--bits", "2,4", "--group-sizes", "32",
                 "--calib", texts["calib"], "--data", texts["data"], "--samples", "4", "--seq-len", "64",
                 "--eval-seq-len", "128", "--eval-windows", "2", "--out", str(out), *extra])


def statuses(out: Path) -> dict[str, str]:
    return {c["label"]: c["status"] for c in json.loads((out / "results.json").read_text())["cells"]}


def test_grid_on_tiny_model_writes_outputs_and_resumes_from_its_cache(tiny_model_dir, texts, tmp_path):
    out = tmp_path / "cmp"
    # The peer runs where its package is installed (the `peers` extra); the lowbit cells always do.
    peers = ["--peers", "hqq"] if importlib.util.find_spec("hqq") is not None else []
    assert compare(tiny_model_dir, texts, out, *peers) == 0
    labels = ["rtn w2 asym g32", "rtn w4 asym g32", "gptq w2 asym g32", "gptq w4 asym g32"]
    labels += ["hqq w2 asym g32", "hqq w4 asym g32"] if peers else []
    assert statuses(out) == dict.fromkeys(labels, "ok")

    saved = json.loads((out / "results.json").read_text())
    original, cells = saved["original"], {c["label"]: c for c in saved["cells"]}
    assert original["kl"] == 0 and original["bits_per_weight"] == 16
    for label, cell in cells.items():
        assert cell["bits_per_weight"] == pytest.approx(cell["bits"] + (32 if "hqq" in label else 16 + cell["bits"]) / 32)
        assert cell["kl"] > 0 and math.isfinite(cell["perplexity"])
        assert cell["model_megabytes"] < original["model_megabytes"]
    assert cells["gptq w4 asym g32"]["kl"] < cells["gptq w2 asym g32"]["kl"]
    points = [(c["bits_per_weight"], c["perplexity"]) for c in saved["cells"]]
    assert {saved["cells"][i]["label"] for i in pareto_front(points)} == \
        {c["label"] for c in saved["cells"] if c["pareto_perplexity"]}

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["original", *labels]
    assert float(rows[3]["perplexity"]) == pytest.approx(cells["gptq w2 asym g32"]["perplexity"])
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.md").read_text().count("\n| ") == 2 + len(labels)
    html = (out / "report.html").read_text()
    assert html.count("<tr") == 1 + 1 + len(labels) and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html

    # Re-run: everything comes from the cache. Then "kill" a run by deleting one finished cell.
    assert compare(tiny_model_dir, texts, out, *peers) == 0
    assert statuses(out) == dict.fromkeys(labels, "cached")
    again = {c["label"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert again["gptq w2 asym g32"]["perplexity"] == cells["gptq w2 asym g32"]["perplexity"]
    (out / "cells" / f"{cells['rtn w4 asym g32']['key']}.json").unlink()
    assert compare(tiny_model_dir, texts, out, *peers) == 0
    assert statuses(out)["rtn w4 asym g32"] == "ok"
    assert list(statuses(out).values()).count("cached") == len(labels) - 1

    # Other calibration windows: only the methods that read calibration data run again.
    assert compare(tiny_model_dir, texts, out, *peers, "--seed", "1") == 0
    assert statuses(out) == {**dict.fromkeys(labels, "cached"), "gptq w2 asym g32": "ok", "gptq w4 asym g32": "ok"}


def test_hqq_peer_weights_are_on_a_grid_of_two_to_the_bits_levels(tmp_path):
    pytest.importorskip("hqq")
    from lowbit.compare.peers import PEERS, PeerJob

    model = tiny_llama()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    job = PeerJob(model=model, tokenizer=None, scheme=Scheme(3, 32, False), linear_names=names, calibration=None,
                  workdir=tmp_path, saved_model=lambda: tmp_path)
    result = PEERS["hqq"]().quantize(job)
    for name in names:
        w, original = result.state[f"{name}.weight"], model.get_submodule(name).weight
        assert w.shape == original.shape and w.dtype == original.dtype
        groups = w.reshape(w.shape[0], -1, 32)
        assert max(len(torch.unique(groups[r, g])) for r in range(4) for g in range(groups.shape[1])) <= 8
        assert (w - original).abs().max() < (original.abs().max() / 2)
    assert PEERS["hqq"]().unsupported(Scheme(4, 64, True)) == "HQQ fits a zero point per group: asymmetric schemes only"


def test_missing_peer_is_skipped_with_a_note(tiny_model_dir, texts, tmp_path, monkeypatch, capsys):
    from lowbit.compare.peers import llmcompressor_peer

    monkeypatch.setattr(llmcompressor_peer, "llmcompressor_python", lambda: None)
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_model_dir), "--methods", "rtn", "--bits", "4", "--group-sizes", "32",
                 "--data", texts["data"], "--eval-seq-len", "128", "--eval-windows", "1", "--out", str(out),
                 "--peers", "llmcompressor-gptq"]) == 0
    assert statuses(out) == {"rtn w4 asym g32": "ok", "llmcompressor-gptq w4 asym g32": "skipped"}
    saved = json.loads((out / "results.json").read_text())
    assert any("llmcompressor-gptq skipped: llm-compressor is not installed" in n for n in saved["meta"]["notes"])
    assert "calibration" not in capsys.readouterr().err  # rtn alone needs no calibration text
    assert saved["meta"]["calibration"] == "none (data-free)"


@pytest.mark.parametrize("argv, message", [
    (["--methods", "rtn,bogus"], "unknown method 'bogus'"),
    (["--axis", "colour=red"], "unknown recipe field 'colour'"),
    (["--peers", "gguf"], "unknown peer 'gguf'"),
    (["--eval-windows", "0"], "--eval-windows must be at least 1"),
])
def test_cli_refuses_bad_grids_in_one_line(argv, message, capsys, tmp_path):
    assert main(["compare", "--out", str(tmp_path / "x"), *argv]) == 2
    output = capsys.readouterr().out
    assert message in output and output.count("\n") <= 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_llmcompressor_peers_on_tiny_model(tiny_model_dir, texts, tmp_path):
    from lowbit.compare.peers import llmcompressor_peer

    if llmcompressor_peer.llmcompressor_python() is None:
        pytest.skip("llm-compressor environment not found (LOWBIT_LLMCOMPRESSOR_PYTHON or ./.venv-llmcompressor)")
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_model_dir), "--methods", "gptq", "--bits", "4", "--group-sizes", "32",
                 "--calib", texts["calib"], "--data", texts["data"], "--samples", "4", "--seq-len", "64",
                 "--eval-seq-len", "128", "--eval-windows", "2", "--out", str(out), "--peers", "llmcompressor"]) == 0
    cells = {c["label"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert {label: c["status"] for label, c in cells.items()} == {
        "gptq w4 asym g32": "ok", "llmcompressor-gptq w4 asym g32": "ok", "llmcompressor-awq w4 asym g32": "ok"}
    ours, theirs = cells["gptq w4 asym g32"], cells["llmcompressor-gptq w4 asym g32"]
    assert theirs["bits_per_weight"] == pytest.approx(ours["bits_per_weight"])
    assert theirs["kl"] == pytest.approx(ours["kl"], rel=1.0)  # same algorithm: same order of magnitude
