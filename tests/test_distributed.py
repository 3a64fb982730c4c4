"""Calibration split across 2 gloo processes: the same Hessians and weights as one process, up to
the order in which the sums are added."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_llama
from lowbit.calibrate.stats import HessianStats
from lowbit.formats import IntegerFormat, QuantizedWeight, WeightFormat
from lowbit.models.architectures import architecture_of
from lowbit.pipeline.distributed import World
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.solvers.gptq import GPTQ

FMT = IntegerFormat(bits=4, symmetric=False, group_size=32)
SAMPLES, SEQ_LEN = 6, 24


@dataclass
class RecordingGPTQ(GPTQ):
    """GPTQ that keeps every Hessian it is given, in solving order."""

    name: ClassVar[str] = "recording-gptq"
    hessians: list[torch.Tensor] = field(default_factory=list)

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None) -> QuantizedWeight:
        self.hessians.append(stats.hessian.clone())
        return super().solve(weight, fmt, stats)


def quantize(world: World, batch_size: int | None) -> dict:
    model = tiny_llama(seed=0)
    calibration = torch.randint(0, 256, (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    solver = RecordingGPTQ()
    codes = {}
    SequentialQuantizer(
        model, architecture_of(model), lambda name, linear: (FMT, solver), batch_size=batch_size,
        on_quantized=lambda name, q: codes.__setitem__(name, q.codes), reduce_stats=world.reduce_stats,
    ).run(world.shard(calibration))
    return {"codes": codes, "hessians": solver.hessians,
            "weights": {k: v.clone() for k, v in model.state_dict().items()}}


def worker(rank: int, port: int, batch_size: int | None, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(quantize(World(rank, 2), batch_size), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two fresh processes importing torch: minutes on a busy 2-core machine
def test_two_gloo_processes_match_one(tmp_path):
    # Rank 0 gets 3 samples in 2 batches, rank 1 gets 3 in 2: the statistics of both are summed.
    mp.spawn(worker, args=(free_port(), 2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    single = quantize(World(), batch_size=None)

    # Both processes solved the same summed problems, so they hold the same model.
    for name in single["weights"]:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
    # That problem is one process's, up to the order of the floating-point sums.
    # One solve per shared input (q/k/v and gate/up are solved stacked): 4 per block, 2 blocks.
    assert len(ranks[0]["hessians"]) == len(single["hessians"]) == 8
    for split, whole in zip(ranks[0]["hessians"], single["hessians"]):
        torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5)
    differing = sum(int((ranks[0]["codes"][n] != single["codes"][n]).sum()) for n in single["codes"])
    total = sum(c.numel() for c in single["codes"].values())
    assert differing <= 0.002 * total, f"{differing} of {total} codes differ"


@pytest.mark.slow
def test_torchrun_cli_export_matches_a_single_process(tmp_path, tiny_model_dir, wikitext):
    """`torchrun --nproc-per-node 2 -m lowbit.cli quantize`: process 0 writes an export whose
    weights match a single process's up to the order of the sums."""
    import subprocess
    import sys
    from pathlib import Path

    from lowbit.export import load_quantized

    args = ["quantize", str(tiny_model_dir), "--method", "gptq", "--group-size", "32", "--no-eval",
            "--calib", str(wikitext / "valid.txt"), "--samples", "4", "--seq-len", "32"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "lowbit.cli", *args, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stdout + single.stderr
    split = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-port", str(free_port()), "-m", "lowbit.cli", *args,
                            "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert split.returncode == 0, split.stdout + split.stderr
    one, _ = load_quantized(tmp_path / "one")
    two, _ = load_quantized(tmp_path / "two")
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        assert (a != b).float().mean() <= 0.01, name
