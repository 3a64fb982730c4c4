"""The AutoRound peer of `lowbit compare`: its weights sit on the scheme's grid, a compare cell runs, and
it is skipped with a note when auto-round cannot be imported."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowbit.cli import main
from lowbit.compare.grid import Scheme
from lowbit.compare.peers import PEERS, PeerJob
from lowbit.compare.peers.autoround_peer import ITERS_VARIABLE
from tests.test_compare import texts  # noqa: F401  (the fixture of the compare tests)

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def peer_job(model_dir, scheme: Scheme, tmp_path) -> tuple[PeerJob, dict[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, len(tokenizer), (4, 32), generator=generator)
    job = PeerJob(model=model, tokenizer=tokenizer, scheme=scheme, linear_names=names, calibration=calibration,
                  workdir=tmp_path, saved_model=lambda: tmp_path)
    return job, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scheme", [Scheme(3, 32, False), Scheme(4, 32, True)])
def test_autoround_weights_have_at_most_two_to_the_bits_levels_per_group(tiny_model_dir, tmp_path, scheme):
    pytest.importorskip("auto_round")
    job, before = peer_job(tiny_model_dir, scheme, tmp_path)
    result = PEERS["autoround"](iters=2).quantize(job)
    assert set(result.state) == {f"{n}.weight" for n in job.linear_names}
    for name in NAMES:
        w, original = result.state[f"{name}.weight"], before[f"{name}.weight"]
        assert w.shape == original.shape and w.dtype == original.dtype
        groups = w.reshape(w.shape[0], -1, 32)
        levels = max(len(torch.unique(groups[r, g])) for r in range(groups.shape[0]) for g in range(groups.shape[1]))
        assert 2 < levels <= 2 ** scheme.bits
        assert (w - original).abs().max() < original.abs().max() / 2
    assert all(torch.equal(v, before[k]) for k, v in job.model.state_dict().items())  # the original is untouched
    assert result.settings["iters"] == 2 and result.settings["nsamples"] == 4 and result.settings["seqlen"] == 32
    assert result.bits_per_weight == pytest.approx(scheme.bits + (16 + (0 if scheme.symmetric else scheme.bits)) / 32)


def test_autoround_iterations_come_from_the_environment(monkeypatch):
    pytest.importorskip("auto_round")
    monkeypatch.setenv(ITERS_VARIABLE, "3")
    assert PEERS["autoround"]().settings(Scheme(4, 32, False))["iters"] == 3
    monkeypatch.delenv(ITERS_VARIABLE)
    assert PEERS["autoround"]().settings(Scheme(4, 32, False))["iters"] == 200  # AutoRound's own default
    monkeypatch.setenv(ITERS_VARIABLE, "many")
    with pytest.raises(ValueError, match="must be a non-negative integer"):
        PEERS["autoround"]().iters()
    assert PEERS["autoround"]().unsupported(Scheme(4, 0, False)).startswith("AutoRound has no per-tensor scheme")


def test_autoround_cell_runs_in_compare(tiny_model_dir, texts, tmp_path, monkeypatch):
    pytest.importorskip("auto_round")
    monkeypatch.setenv(ITERS_VARIABLE, "2")
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_model_dir), "--methods", "rtn", "--bits", "4", "--group-sizes", "32",
                 "--calib", texts["calib"], "--data", texts["data"], "--samples", "4", "--seq-len", "64",
                 "--eval-seq-len", "128", "--eval-windows", "1", "--out", str(out), "--peers", "autoround"]) == 0
    cells = {c["label"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    cell = cells["autoround w4 asym g32"]
    assert cell["status"] == "ok", cell.get("note")
    assert cell["peer_settings"]["iters"] == 2 and cell["version"].startswith("auto-round ")
    assert cell["bits_per_weight"] == pytest.approx(4 + 20 / 32)
    assert 0 < cell["kl"] and cell["perplexity"] > 1


def test_autoround_is_skipped_with_a_note_when_it_cannot_be_imported(tiny_model_dir, texts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "auto_round", None)  # import auto_round now fails
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_model_dir), "--methods", "rtn", "--bits", "4", "--group-sizes", "32",
                 "--data", texts["data"], "--eval-seq-len", "128", "--eval-windows", "1", "--out", str(out),
                 "--peers", "autoround"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert {c["label"]: c["status"] for c in saved["cells"]} == {"rtn w4 asym g32": "ok",
                                                                 "autoround w4 asym g32": "skipped"}
    assert any("autoround skipped: auto-round is not installed" in n for n in saved["meta"]["notes"])
