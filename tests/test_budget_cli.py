"""`lowbit plan` and `lowbit quantize --target-bits` on a tiny saved model: plan, size on disk, replay."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from lowbit.budget.size import saved_size
from lowbit.cli import main
from lowbit.recipes import Recipe


def _common(model_dir, wikitext, cache) -> list[str]:
    return [str(model_dir), "--asym", "--method", "rtn", "--calib", str(wikitext / "valid.txt"), "--samples", "2",
            "--seq-len", "32", "--sensitivity-cache", str(cache), "--fisher-samples", "2"]


def test_plan_then_quantize_to_a_target(tmp_path, tiny_model_dir, wikitext, capsys):
    common = _common(tiny_model_dir, wikitext, tmp_path / "cache")
    assert main(["plan", *common, "--target-bits", "3.5", "--save-recipe", str(tmp_path / "plan.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "predicted:" in printed and "down_proj" in printed

    out = tmp_path / "out"
    assert main(["quantize", *common, "--target-bits", "3.5", "--out", str(out), "--no-eval"]) == 0
    capsys.readouterr()
    saved_plan = tmp_path / "out.plan.yaml"
    assert Recipe.load(saved_plan) == Recipe.load(tmp_path / "plan.yaml")  # same table (cached), same plan
    size = saved_size(out)
    assert 3.5 * 0.99 <= size.bits_per_weight <= 3.5
    assert len({round(bits, 6) for bits in size.layers.values()}) > 1  # really mixed

    # Replaying the plan file gives the same checkpoint.
    assert main(["quantize", str(tiny_model_dir), "--recipe", str(saved_plan), "--calib",
                 str(wikitext / "valid.txt"), "--samples", "2", "--seq-len", "32", "--out", str(tmp_path / "replay"),
                 "--no-eval"]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "replay" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_infeasible_budgets_are_one_line_errors(tmp_path, tiny_model_dir, wikitext, capsys):
    common = _common(tiny_model_dir, wikitext, tmp_path / "cache")
    assert main(["plan", *common, "--target-bits", "1.5"]) == 2
    printed = capsys.readouterr().out
    assert "choose a budget between 2." in printed and "bits/weight" in printed
    assert main(["plan", *common, "--max-size", "1kB"]) == 2
    assert "choose a budget between" in capsys.readouterr().out
    assert main(["plan", *common]) == 2
    assert "needs a budget" in capsys.readouterr().out


def test_plan_with_trace_weighting_and_evolution(tmp_path, tiny_model_dir, wikitext, capsys):
    common = _common(tiny_model_dir, wikitext, tmp_path / "cache")
    recipe_file = tmp_path / "plan.yaml"
    assert main(["plan", *common, "--target-bits", "3.5", "--weighting", "trace", "--evolve", "2",
                 "--save-recipe", str(recipe_file)]) == 0
    printed = capsys.readouterr().out
    assert "evolutionary refinement: KL on its calibration windows" in printed
    assert Recipe.load(recipe_file).overrides  # a mixed plan that replays
    assert main(["plan", *common, "--target-bits", "3.5", "--evolve", "-1"]) == 2
    assert "--evolve must be >= 0" in capsys.readouterr().out
