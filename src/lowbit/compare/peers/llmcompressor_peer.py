"""llm-compressor (GPTQ, AWQ) as a peer, run in its own Python environment.

llm-compressor pins a transformers release older than lowbit's, so it usually lives in a separate
virtual environment: set LOWBIT_LLMCOMPRESSOR_PYTHON to that environment's python, or create
`.venv-llmcompressor` in the working directory (benchmarks/setup_llmcompressor.sh). The worker
script next to this file runs there on the original model saved by lowbit and on the very
calibration tensor lowbit uses, and returns dense quantize-dequantized weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch

from lowbit.compare.grid import Scheme
from lowbit.compare.peers.base import ALIASES, Peer, PeerError, PeerJob, PeerResult, integer_bits_per_weight, register_peer

WORKER = Path(__file__).with_name("llmcompressor_worker.py")
PYTHON_VARIABLE = "LOWBIT_LLMCOMPRESSOR_PYTHON"
LOCAL_VENV = Path(".venv-llmcompressor") / "bin" / "python"


def llmcompressor_python() -> Path | None:
    """The interpreter that can import llmcompressor: $LOWBIT_LLMCOMPRESSOR_PYTHON, this one, or ./.venv-llmcompressor."""
    configured = os.environ.get(PYTHON_VARIABLE)
    if configured:
        return Path(configured)
    if importlib.util.find_spec("llmcompressor") is not None:
        return Path(sys.executable)
    return LOCAL_VENV.resolve() if LOCAL_VENV.is_file() else None


class _LLMCompressorPeer(Peer):
    tool = "llm-compressor"
    algorithm: ClassVar[str]

    def unavailable(self) -> str | None:
        python = llmcompressor_python()
        if python is None:
            return (f"llm-compressor is not installed here; set {PYTHON_VARIABLE} to the python of an environment "
                    "that has it (bash benchmarks/setup_llmcompressor.sh creates .venv-llmcompressor)")
        if not python.is_file():
            return f"{PYTHON_VARIABLE}={python} does not exist"
        return None

    def unsupported(self, scheme: Scheme) -> str | None:
        if scheme.group_size == 0:
            return "llm-compressor's tensor strategy is not wired here; use a group size or -1 (per channel)"
        return None

    def settings(self, scheme: Scheme) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "bits": scheme.bits, "group_size": scheme.group_size,
                "symmetric": scheme.symmetric, "ignore": ["lm_head"],
                "options": "GPTQModifier(actorder=None, block_size=128, dampening_frac=0.01)"
                if self.algorithm == "gptq" else "AWQModifier() + QuantizationModifier (defaults)"}

    def quantize(self, job: PeerJob) -> PeerResult:
        if job.calibration is None:
            raise PeerError("llm-compressor needs calibration data; pass --calib")
        out = job.workdir
        out.mkdir(parents=True, exist_ok=True)
        windows = out / "calibration_windows.pt"
        torch.save(job.calibration.to(torch.int64).contiguous(), windows)
        command = [
            str(llmcompressor_python()), str(WORKER), "--model-dir", str(job.saved_model()),
            "--windows", str(windows), "--out-dir", str(out), "--algorithm", self.algorithm,
            "--bits", str(job.scheme.bits), "--group-size", str(job.scheme.group_size),
            "--threads", str(torch.get_num_threads()),
        ] + (["--symmetric"] if job.scheme.symmetric else [])
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        log = out / "worker.log"
        with open(log, "w") as f:
            done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            raise PeerError(f"llm-compressor worker failed (exit {done.returncode}): "
                            f"{lines[-1] if lines else 'no output'} (log: {log})")
        result = json.loads((out / "result.json").read_text())
        from safetensors.torch import load_file

        state = load_file(str(out / "weights.safetensors"))
        (out / "weights.safetensors").unlink()
        windows.unlink()
        names = set(result["quantized"])
        if names != set(job.linear_names):
            raise PeerError(f"llm-compressor quantized other layers than lowbit: only it "
                            f"{sorted(names - set(job.linear_names))[:3]}, only lowbit "
                            f"{sorted(set(job.linear_names) - names)[:3]}")
        shapes = [job.model.get_submodule(name).weight.shape for name in job.linear_names]
        return PeerResult(
            state=state,
            bits_per_weight=integer_bits_per_weight(shapes, job.scheme),
            seconds=result["oneshot_seconds"],
            version=result["versions"]["llmcompressor"],
            settings={**self.settings(job.scheme), **result["settings"], "versions": result["versions"],
                      "storage": "counted as lowbit counts the same layout: 16-bit scales, zero points at "
                                 "the code width"},
        )


@register_peer
class LLMCompressorGPTQ(_LLMCompressorPeer):
    name = "llmcompressor-gptq"
    algorithm = "gptq"


@register_peer
class LLMCompressorAWQ(_LLMCompressorPeer):
    name = "llmcompressor-awq"
    algorithm = "awq"


ALIASES["llmcompressor"] = [LLMCompressorGPTQ.name, LLMCompressorAWQ.name]
