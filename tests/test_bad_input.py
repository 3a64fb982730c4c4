"""Bad input: one clear line, exit code 2, and nothing left at the output path that looks complete.

The cases the README's table lists; test_cli.py covers missing paths, folders without a config,
group sizes that do not divide a layer and output folders that are not ours.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_refused(code: int, out: str, *expected: str) -> None:
    assert code == 2, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for text in expected:
        assert text in errors[0], errors[0]


def assert_nothing_complete(out_dir: Path) -> None:
    assert not (out_dir / "config.json").exists() and not (out_dir / "lowbit.json").exists()
    assert not any(out_dir.parent.glob(f".{out_dir.name}.lowbit-partial-*"))


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def quantize(capsys, model: Path | str, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli(capsys, "quantize", str(model), "--method", "rtn", "--group-size", "32", "--out", str(out),
                   "--no-eval", *extra)


def test_unsupported_architecture_lists_the_supported_ones(capsys, tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, out = quantize(capsys, tmp_path / "gpt2", tmp_path / "out")
    assert_refused(code, out, "'gpt2' is not supported", "llama")
    assert_nothing_complete(tmp_path / "out")


def test_unreadable_config(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    code, out = quantize(capsys, tmp_path / "m", tmp_path / "out")
    assert_refused(code, out, "config.json is not a readable JSON config")


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root reads files whatever their permissions")
def test_unreadable_model_folder(capsys, model_copy, tmp_path):
    (model_copy / "model.safetensors").chmod(0)
    code, out = quantize(capsys, model_copy, tmp_path / "out")
    assert_refused(code, out, "could not load")


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_damaged_safetensors(capsys, model_copy, tmp_path, damage):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x10" + b"\x00" * 7 + b"{not json}")
    code, out = quantize(capsys, model_copy, tmp_path / "out")
    assert_refused(code, out, "could not load", "damaged or incomplete")
    assert_nothing_complete(tmp_path / "out")


def test_truncated_gguf(capsys, tmp_path, has_default_model):
    from lowbit.models.loading import default_model_path

    with open(default_model_path(), "rb") as source:
        (tmp_path / "cut.gguf").write_bytes(source.read(1_000_000))
    code, out = quantize(capsys, tmp_path / "cut.gguf", tmp_path / "out")
    assert_refused(code, out, "could not load cut.gguf", "damaged or incomplete")
    assert_nothing_complete(tmp_path / "out")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused_before_work(capsys, model_copy, tmp_path, value):
    weights = load_file(model_copy / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    code, out = quantize(capsys, model_copy, tmp_path / "out")
    assert_refused(code, out, "model.layers.1.mlp.up_proj.weight contains 1 NaN/Inf")
    assert_nothing_complete(tmp_path / "out")
    assert not (tmp_path / ".out.lowbit-run").exists()


@pytest.mark.parametrize("text, expected", [("", "contains no text"), ("only a few words\n", "tokens")])
def test_empty_or_too_short_calibration(capsys, tiny_model_dir, tmp_path, text, expected):
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), "--method", "gptq", "--group-size", "32",
                        "--calib", str(calib), "--samples", "4", "--seq-len", "64", "--out", str(tmp_path / "out"),
                        "--no-eval")
    assert_refused(code, out, expected)
    assert_nothing_complete(tmp_path / "out")
    assert not (tmp_path / ".out.lowbit-run").exists()


def test_a_quantized_output_head_with_resume_is_refused(capsys, tiny_model_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: rtn\nbits: 4\ngroup_size: 32\nignore: []\n")
    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), "--recipe", str(recipe), "--out",
                        str(tmp_path / "out"), "--no-eval", "--resume")
    assert_refused(code, out, "--resume does not cover a quantized output head (lm_head)")
    assert_nothing_complete(tmp_path / "out")


def test_output_path_that_is_a_file(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    code, out = quantize(capsys, tiny_model_dir, tmp_path / "out")
    assert_refused(code, out, "not a directory")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_disk_full_during_export(capsys, tiny_model_dir, tmp_path, monkeypatch):
    from lowbit.export import shards

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(shards, "save_safetensors", full)
    code, out = quantize(capsys, tiny_model_dir, tmp_path / "out")
    assert_refused(code, out, "no space left", "--resume")
    assert_nothing_complete(tmp_path / "out")


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 2 MiB tmpfs (root only): a real full disk, as safetensors reports it."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_really_full_disk(capsys, tiny_model_dir, tiny_filesystem):
    out_dir = tiny_filesystem / "out"
    code, out = quantize(capsys, tiny_model_dir, out_dir)
    assert_refused(code, out, "no space left", "--resume")
    assert_nothing_complete(out_dir)


def test_gpu_out_of_memory_suggests_offloading(capsys, tiny_model_dir, tmp_path, monkeypatch):
    from lowbit.pipeline.sequential import SequentialQuantizer

    def run(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(SequentialQuantizer, "run", run)
    code, out = quantize(capsys, tiny_model_dir, tmp_path / "out")
    assert_refused(code, out, "out of GPU memory", "--offload-activations", "--batch-size")
    assert_nothing_complete(tmp_path / "out")


@pytest.mark.parametrize("command", [["eval", "default"], ["generate", "default", "--prompt", "hi"],
                                     ["plan", "--target-bits", "4"], ["quantize", "--no-export", "--no-eval"]])
def test_a_device_this_machine_lacks_is_refused_in_one_line(capsys, command):
    code, out = run_cli(capsys, *command, "--device", "gpu0")
    assert_refused(code, out, "'gpu0' is not a device", "cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        code, out = run_cli(capsys, *command, "--device", "cuda")
        assert_refused(code, out, "no CUDA device is available here", "--device cpu")


def test_compare_with_a_wrong_device_leaves_no_folder(capsys, tmp_path):
    code, out = run_cli(capsys, "compare", "--device", "gpu0", "--out", str(tmp_path / "cmp"))
    assert_refused(code, out, "'gpu0' is not a device")
    assert not (tmp_path / "cmp").exists()


def test_a_recipe_that_would_quantize_a_linear_outside_the_blocks_is_refused():
    """Besides the output head, lowbit quantizes the blocks' linears only: a recipe that does not
    ignore another linear (here one added beside the blocks) is refused before any work."""
    from torch import nn

    from lowbit.api import check_plan
    from lowbit.models.architectures import architecture_of
    from lowbit.recipes import Recipe, RecipeError
    from tests.conftest import tiny_llama

    model = tiny_llama()
    model.model.extra_proj = nn.Linear(64, 64)
    with pytest.raises(RecipeError, match="model.extra_proj is outside the decoder blocks.*'model.extra_proj' to the"):
        check_plan(model, architecture_of(model), Recipe(method="rtn", group_size=32, ignore=[]), exporting=True)
    assert check_plan(model, architecture_of(model), Recipe(method="rtn", group_size=32, ignore=["lm_head", "*extra*"]),
                      exporting=True) == 14


def test_quantize_head_with_a_budget_is_refused(capsys, tiny_model_dir, tmp_path):
    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), "--quantize-head", "--target-bits", "3.5",
                        "--out", str(tmp_path / "out"), "--no-eval")
    assert_refused(code, out, "a budget plans the blocks' linears only")
    assert_nothing_complete(tmp_path / "out")
