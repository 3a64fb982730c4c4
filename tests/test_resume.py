"""Interrupted runs: kill -9 a real `lowbit quantize`, resume it, get the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.export import ExportError, load_quantized
from lowbit.pipeline.resume import MANIFEST, STALL_ENV, run_folder

REPO = Path(__file__).resolve().parents[1]


def quantize_args(model_dir: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return [
        "quantize", str(model_dir), "--method", "gptq", "--group-size", "32", "--calib", str(calib),
        "--samples", "4", "--seq-len", "32", "--batch-size", "2", "--out", str(out), "--no-eval", *extra,
    ]


def launch(args: list[str], **env: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "lowbit.cli", *args], env=environment, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; lowbit.json without the time it was written, the one thing two runs may differ in."""
    files = {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}
    metadata = json.loads(files.pop("lowbit.json"))
    del metadata["created"]
    files["lowbit.json (but created)"] = json.dumps(metadata).encode()
    return files


def wait_for_blocks(folder: Path, blocks: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((folder / MANIFEST).read_text())["blocks_done"] >= blocks:
                return
        except (OSError, ValueError, KeyError):
            pass
        if process.poll() is not None:
            raise AssertionError(f"the run ended before block {blocks}: {process.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError("the run never committed a block")


def test_kill_9_then_resume_gives_the_uninterrupted_export(tmp_path, tiny_model_dir, wikitext):
    calib = wikitext / "valid.txt"
    reference_out = tmp_path / "reference"
    assert main(quantize_args(tiny_model_dir, reference_out, calib)) == 0

    out = tmp_path / "resumed"
    process = launch(quantize_args(tiny_model_dir, out, calib), **{STALL_ENV: "0"})
    try:
        wait_for_blocks(run_folder(out), 1, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not out.exists()
    with pytest.raises(ExportError, match="unfinished lowbit run"):
        load_quantized(run_folder(out))

    # Without --resume the state is not silently dropped.
    assert main(quantize_args(tiny_model_dir, out, calib)) == 2
    resumed = launch(quantize_args(tiny_model_dir, out, calib, "--resume"))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert files_of(out) == files_of(reference_out)
    assert json.loads((out / "lowbit.json").read_text())["complete"] is True
    assert not run_folder(out).exists()


class Interrupt(KeyboardInterrupt):
    """Stands for a kill arriving at a chosen point of a block's commit."""


def test_crash_between_block_file_and_manifest_redoes_the_block(tmp_path, tiny_model_dir, wikitext, monkeypatch,
                                                                capsys):
    """The block's file is on disk but the manifest never counted it: resume redoes that block.

    The interrupted run spills its activations to disk and the reference keeps them in memory,
    so this also checks that spilling changes nothing.
    """
    from lowbit.pipeline import resume

    calib = wikitext / "valid.txt"
    reference = tmp_path / "reference"
    assert main(quantize_args(tiny_model_dir, reference, calib)) == 0

    out = tmp_path / "out"
    original = resume.write_json_atomic

    def write_manifest(path, data):
        if data.get("blocks_done") == 2:  # block 1 and its outputs are committed, the manifest is not
            raise Interrupt
        original(path, data)

    monkeypatch.setattr(resume, "write_json_atomic", write_manifest)
    assert main(quantize_args(tiny_model_dir, out, calib, "--offload-activations")) == 130
    monkeypatch.setattr(resume, "write_json_atomic", original)
    state = json.loads((run_folder(out) / MANIFEST).read_text())
    assert state["blocks_done"] == 1 and state["complete"] is False
    assert (run_folder(out) / "blocks" / "block-00001.safetensors").is_file()

    # A different calibration cannot continue this run.
    assert main(quantize_args(tiny_model_dir, out, calib, "--offload-activations", "--resume", "--seed", "1")) == 2
    assert "calibration" in capsys.readouterr().out

    assert main(quantize_args(tiny_model_dir, out, calib, "--offload-activations", "--resume")) == 0
    assert files_of(out) == files_of(reference)


def test_rtn_run_resumes_without_activations(tmp_path, tiny_model_dir, monkeypatch):
    from lowbit.pipeline import resume

    args = ["quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32", "--no-eval"]
    assert main([*args, "--out", str(tmp_path / "reference")]) == 0
    original = resume.RunCheckpoint.after_block

    def after_block(self, index, block, outputs):
        original(self, index, block, outputs)
        raise Interrupt

    monkeypatch.setattr(resume.RunCheckpoint, "after_block", after_block)
    assert main([*args, "--out", str(tmp_path / "out")]) == 130
    monkeypatch.setattr(resume.RunCheckpoint, "after_block", original)
    assert main([*args, "--out", str(tmp_path / "out"), "--resume"]) == 0
    assert files_of(tmp_path / "out") == files_of(tmp_path / "reference")
    model, _ = load_quantized(tmp_path / "out")
    reference, _ = load_quantized(tmp_path / "reference")
    ids = torch.arange(16)[None]
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_overwrite_discards_an_unfinished_run(tmp_path, tiny_model_dir, monkeypatch):
    from lowbit.pipeline import resume

    args = ["quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32", "--no-eval",
            "--out", str(tmp_path / "out")]
    original = resume.RunCheckpoint.after_block

    def after_block(self, index, block, outputs):
        original(self, index, block, outputs)
        raise Interrupt

    monkeypatch.setattr(resume.RunCheckpoint, "after_block", after_block)
    assert main(args) == 130
    monkeypatch.setattr(resume.RunCheckpoint, "after_block", original)
    assert run_folder(tmp_path / "out").is_dir()
    assert main([*args, "--overwrite"]) == 0
    assert not run_folder(tmp_path / "out").exists()
    assert json.loads((tmp_path / "out" / "lowbit.json").read_text())["complete"] is True
