"""Block-boundary activations on disk: exact round trips, and damage is reported, not misread."""

from __future__ import annotations

import pytest
import torch

from lowbit.pipeline.activations import ActivationError, SpilledActivations, load_activations, save_activations


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_saved_activations_read_back_exactly(tmp_path, dtype):
    tensors = [torch.randn(2, 5, 8).to(dtype), torch.randn(1, 5, 8).to(dtype)]
    save_activations(tmp_path / "block-00001", tensors)
    loaded = load_activations(tmp_path / "block-00001")
    assert [t.dtype for t in loaded] == [dtype, dtype]
    assert all(torch.equal(a, b) for a, b in zip(tensors, loaded))
    assert not (tmp_path / "block-00001.tmp").exists()


def test_truncated_activation_file_is_an_error(tmp_path):
    save_activations(tmp_path / "a", [torch.randn(3, 4)])
    path = tmp_path / "a" / "batch-00000.bin"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ActivationError, match="damaged"):
        load_activations(tmp_path / "a")


def test_unsealed_spill_folder_is_not_readable(tmp_path):
    spill = SpilledActivations(tmp_path)
    spill.begin_block(0)
    kept = spill.keep(torch.arange(6.0).reshape(2, 3))
    assert torch.equal(kept, torch.arange(6.0).reshape(2, 3))
    with pytest.raises(ActivationError):
        load_activations(spill.folder(1))
    spill.seal_block(0)
    assert torch.equal(load_activations(spill.folder(1))[0], kept)
    spill.discard(1)
    assert not spill.folder(1).exists() and torch.equal(kept, torch.arange(6.0).reshape(2, 3))
