"""The command line: bad input gets one clear line and a non-zero exit, and nothing that looks complete."""

from __future__ import annotations

from lowbit.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_missing_model_path(capsys, tmp_path):
    code, out = run_cli(capsys, "quantize", str(tmp_path / "nope"), "--no-eval")
    assert code == 2
    assert "error:" in out and "no model at" in out
    assert "Traceback" not in out


def test_missing_gguf_file(capsys, tmp_path):
    code, out = run_cli(capsys, "quantize", str(tmp_path / "model.gguf"), "--no-eval")
    assert code == 2 and "GGUF file not found" in out


def test_folder_without_config(capsys, tmp_path):
    code, out = run_cli(capsys, "quantize", str(tmp_path), "--no-eval")
    assert code == 2 and "no config.json" in out


def test_unknown_recipe_option_is_refused_before_loading(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: gptq\nmethod_options: {dampening: 0.1}\n")
    code, out = run_cli(capsys, "quantize", str(tmp_path / "nope"), "--recipe", str(recipe))
    assert code == 2 and "bad option for method 'gptq'" in out


def test_group_size_that_does_not_divide_is_refused_before_work(capsys, tmp_path, tiny_model_dir, monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("a local folder's layer shapes are checked from its config, before its weights load")

    monkeypatch.setattr("lowbit.api.load_model", load_model)
    out_dir = tmp_path / "out"
    code, out = run_cli(
        capsys, "quantize", str(tiny_model_dir), "--group-size", "128", "--out", str(out_dir), "--no-eval"
    )
    assert code == 2
    assert "64" in out and "divide" in out
    assert not out_dir.exists()


def test_output_folder_that_is_not_ours_is_refused(capsys, tmp_path, tiny_model_dir):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "precious.txt").write_text("keep me")
    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), "--method", "rtn", "--out", str(out_dir),
                        "--no-eval")
    assert code == 2 and "--overwrite" in out
    assert (out_dir / "precious.txt").read_text() == "keep me"


def test_rtn_quantize_writes_a_reloadable_export(capsys, tmp_path, tiny_model_dir):
    out_dir = tmp_path / "out"
    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32",
                        "--out", str(out_dir), "--no-eval")
    assert code == 0, out
    assert (out_dir / "config.json").is_file() and (out_dir / "lowbit.json").is_file()
    assert "differ from the in-memory model by at most 0.00e+00" in out
    # A second run may replace a lowbit export without --overwrite.
    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32",
                        "--out", str(out_dir), "--no-eval")
    assert code == 0, out


def test_eval_of_the_embedded_model_by_name(capsys, wikitext, has_default_model):
    code, out = run_cli(capsys, "eval", "default", "--data", str(wikitext / "test.txt"), "--seq-len", "128",
                        "--windows", "1")
    assert code == 0, out
    assert "1 x 128" in out


def test_quantize_head_quantizes_the_output_head(capsys, caplog, tmp_path, tiny_model_dir, wikitext):
    """--quantize-head: GPTQ on the head too (the tiny model ties it to the embedding: untied, the
    embedding kept exact); the saved recipe leaves lm_head out of ignore, and the export lists
    nothing to ignore, reloads to the same logits, scores and decodes."""
    import json

    from safetensors import safe_open

    out_dir = tmp_path / "out"
    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), "--quantize-head", "--asym", "--group-size", "32",
                        "--calib", str(wikitext / "valid.txt"), "--samples", "4", "--seq-len", "64", "--out",
                        str(out_dir), "--no-eval", "--save-recipe", str(tmp_path / "recipe.yaml"))
    assert code == 0, out
    assert "differ from the in-memory model by at most 0.00e+00" in out
    assert "shares its weight with the input embedding" in caplog.text  # tied: the checkpoint grows
    assert "ignore: []" in (tmp_path / "recipe.yaml").read_text()
    config = json.loads((out_dir / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == [] and config["tie_word_embeddings"] is False
    names = set()
    for shard in out_dir.glob("*.safetensors"):
        with safe_open(shard, "pt") as tensors:
            names |= set(tensors.keys())
    assert "lm_head.weight_packed" in names and "model.embed_tokens.weight" in names
    code, out = run_cli(capsys, "eval", str(out_dir), "--data", str(wikitext / "test.txt"), "--seq-len", "64",
                        "--windows", "1")
    assert code == 0, out
    code, out = run_cli(capsys, "generate", str(out_dir), "--prompt", "The capital of France is", "--new-tokens",
                        "2", "--device", "cpu")
    assert code == 0, out
