"""Fuzzing the readers of lowbit's own run state: mutated files give the documented error, nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.export import check_export_folder
from lowbit.pipeline.activations import ActivationError, load_activations, save_activations
from lowbit.pipeline.resume import MANIFEST, ResumeError, RunCheckpoint, run_folder

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buffer = bytearray(data)
    for position, value in edits:
        if buffer:
            buffer[position % len(buffer)] = value
    return bytes(buffer if cut is None else buffer[: cut % (len(buffer) + 1)])


edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8)
cuts = st.one_of(st.none(), st.integers(0, 10_000))


@FUZZ
@given(edits=edits, cut=cuts, target=st.sampled_from(["index.json", "batch-00000.bin"]))
def test_mutated_activations_raise_activation_error(tmp_path_factory, edits, cut, target):
    folder = tmp_path_factory.mktemp("acts") / "block-00001"
    tensors = [torch.randn(2, 3, 4), torch.randn(1, 3, 4)]
    save_activations(folder, tensors)
    path = folder / target
    path.write_bytes(mutate(path.read_bytes(), edits, cut))
    try:
        loaded = load_activations(folder)
    except ActivationError:
        return
    # Whatever loads is exactly as large as its file: a shape that disagrees is never mapped.
    for number, tensor in enumerate(loaded):
        assert tensor.numel() * tensor.element_size() == (folder / f"batch-{number:05d}.bin").stat().st_size


FINGERPRINT = {"recipe": "a", "model": "b", "calibration": "c", "settings": "d"}


def interrupted_run_manifest(out) -> Path:
    """The manifest of a run of two blocks at `out` that stopped before its first block."""
    checkpoint = RunCheckpoint.claim(out, resume=False, overwrite=False)
    checkpoint.start(FINGERPRINT, 2)
    checkpoint.release()
    return run_folder(out) / MANIFEST


@FUZZ
@given(edits=edits, cut=cuts)
def test_mutated_run_manifest_raises_resume_error(tmp_path_factory, edits, cut):
    out = tmp_path_factory.mktemp("run") / "out"
    manifest = interrupted_run_manifest(out)
    manifest.write_bytes(mutate(manifest.read_bytes(), edits, cut))
    try:
        resumed = RunCheckpoint.claim(out, resume=True, overwrite=False)
        try:
            done = resumed.start(FINGERPRINT, 2)
            assert 0 <= done <= 2
        finally:
            resumed.release()
    except ResumeError:
        pass
    assert check_export_folder(run_folder(out)) is not None  # never taken for a finished export


@pytest.mark.parametrize("done", [10, -1, "2", True, None])
def test_a_manifest_counting_blocks_the_run_does_not_have_is_refused(tmp_path, done):
    """Found by the fuzz test above: one byte turned blocks_done 0 into 10 of 2."""
    out = tmp_path / "out"
    manifest = interrupted_run_manifest(out)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "blocks_done": done}))
    resumed = RunCheckpoint.claim(out, resume=True, overwrite=False)
    try:
        with pytest.raises(ResumeError, match="finished blocks of 2"):
            resumed.start(FINGERPRINT, 2)
    finally:
        resumed.release()


@FUZZ
@given(edits=edits, cut=cuts)
def test_mutated_lowbit_json_is_never_taken_for_complete_unless_it_says_so(tmp_path_factory, edits, cut):
    folder = tmp_path_factory.mktemp("export")
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    (folder / "model.safetensors").write_bytes(b"")
    original = json.dumps({"complete": False, "blocks_done": 1, "blocks_total": 2}).encode()
    (folder / "lowbit.json").write_bytes(mutate(original, edits, cut))
    problem = check_export_folder(folder)
    try:
        data = json.loads((folder / "lowbit.json").read_bytes())
    except ValueError:
        assert problem is not None
        return
    says_complete = isinstance(data, dict) and (data.get("complete") is True or "complete" not in data)
    assert (problem is None) == says_complete
