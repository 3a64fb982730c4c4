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
