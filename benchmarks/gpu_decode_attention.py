"""One decode step's attention over a static KV cache: decode_attention against the masked SDPA it replaced.

StaticDecoder keeps a [batch, kv_heads, max_len, head_dim] cache and masks the positions not
written yet, so torch's scaled_dot_product_attention reads all max_len positions at every step,
whatever the position; decode_attention.attend reads the written ones only, cut into chunks. This
times both for a Llama-3-8B-shaped layer (32 query heads, 8 key/value heads, head_dim 128) at
batch 1 and 16, over caches of 256 to 4096 positions, at the cache's first quarter and its last
position (CUDA-graph replays, cold L2: a layer's cache was last read a step ago, with every other
layer's weights since), and decode_attention over the same entries in coded caches (int8 and fp8
codes with a scale per position and head, kv/row_codes.py).
SDPA's mask is made outside the timed call, as StaticDecoder made it once
a step for all layers.

    python benchmarks/gpu_decode_attention.py --out benchmarks/results/gpu_decode_attention_h200
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
from pathlib import Path

import torch

from lowbit.kernels import decode_attention
from lowbit.kernels.timing import graph_time_ms
from lowbit.kv.row_codes import CODES, CodedCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import run_cases  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
ROUNDS = 5
SETTINGS = [f"{decode_attention.TARGET_PROGRAMS}/{decode_attention.STAGES}/{decode_attention.WARPS}"]
"""decode_attention's settings timed (SETTING_NAMES), one column each (--settings)."""


CODED_SETTINGS = [f"{kind}/{decode_attention.CODED_TARGET_PROGRAMS}/{decode_attention.STAGES}/{decode_attention.WARPS}"
                  for kind in CODES]
"""decode_attention's settings timed over each coded cache, one column each (--coded-settings)."""
SETTING_NAMES = ("TARGET_PROGRAMS", "STAGES", "WARPS")
"""A setting "T/S" or "T/S/W" gives these of decode_attention's constants, in order."""
CODED_SETTING_NAMES = ("CODED_TARGET_PROGRAMS", "STAGES", "WARPS")
"""A setting "KIND/T/S/W" over a coded cache (int8-token, fp8) gives these after the kind, in order."""


def attend_with(setting: str, *args, names: tuple[str, ...] = SETTING_NAMES) -> torch.Tensor:
    """decode_attention.attend with the setting's constants (`names`) in place of its own."""
    values = dict(zip(names, (int(v) for v in setting.split("/"))))
    saved = {name: getattr(decode_attention, name) for name in values}
    for name, value in values.items():
        setattr(decode_attention, name, value)
    try:
        return decode_attention.attend(*args)
    finally:
        for name, value in saved.items():
            setattr(decode_attention, name, value)


def coded_caches(keys: torch.Tensor, values: torch.Tensor, written: torch.Tensor, kind: str) -> list[CodedCache]:
    """Coded caches of `kind` shaped as keys and values [batch, kv_heads, max_len, D], holding their
    entries at positions `written` (the last of them kept exact, as a decode step keeps its own)."""
    batch, kv_heads, max_len, dim = keys.shape
    caches = [CodedCache.empty(batch, kv_heads, max_len, dim, keys.device, keys.dtype, CODES[kind]) for _ in range(2)]
    for cache, entries in zip(caches, (keys, values)):
        cache.write(entries[:, :, written], written)
    return caches


def run_case(case: tuple[int, int, str]) -> list[dict]:
    batch, max_len, where = case
    position = max_len // 4 - 1 if where == "first quarter" else max_len - 1
    generator = torch.Generator("cuda").manual_seed(batch * max_len)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", generator=generator).to(torch.bfloat16)
    keys, values = (torch.randn(batch, KV_HEADS, max_len, HEAD_DIM, device="cuda", generator=generator)
                    .to(torch.bfloat16) for _ in range(2))
    pos = torch.tensor([position], device="cuda")
    visible = decode_attention.visible_mask(torch.arange(max_len, device="cuda"), pos, q.dtype)
    ref = decode_attention.reference_attention(q, keys, values, position)
    calls = {"sdpa": lambda: decode_attention.masked_sdpa(q, keys, values, visible)}
    for setting in SETTINGS:
        calls[f"lowbit {setting}"] = functools.partial(attend_with, setting, q, keys, values, pos)
    written = torch.arange(position + 1, device="cuda")
    for setting in CODED_SETTINGS:
        kind, numbers = setting.split("/", 1)
        coded = coded_caches(keys, values, written, kind)
        calls[f"lowbit {setting}"] = functools.partial(attend_with, numbers, q, *coded, pos, names=CODED_SETTING_NAMES)
    row = {"batch": batch, "max_len": max_len, "position": position}
    for name, call in calls.items():
        row[f"{name} error"] = float((call().double() - ref).norm() / ref.norm())
    rounds = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, call in calls.items():
            rounds[name].append(1000 * graph_time_ms(call))
    row |= {f"{name} us": statistics.median(times) for name, times in rounds.items()}
    print(row, flush=True)
    return [row]


def markdown(rows: list[dict]) -> str:
    chunks = [key.removeprefix("lowbit ") for key in rows[0] if key.startswith("lowbit ") and key.endswith(" us")]
    chunks = [c.removesuffix(" us") for c in chunks]
    lines = [f"Decode attention of one Llama-3-8B-shaped layer ({HEADS} query heads, {KV_HEADS} key/value heads, "
             f"head_dim {HEAD_DIM}, bf16) on {torch.cuda.get_device_name()} (torch {torch.__version__}); microseconds "
             "per call, CUDA-graph replays, cold L2 (benchmarks/gpu_decode_attention.py).",
             f"Medians of {ROUNDS} rounds in turns.", "",
             "Columns 'lowbit T/S[/W]' give decode_attention with TARGET_PROGRAMS T (the launch's programs it cuts "
             "the written prefix for), STAGES S (tiles of keys and values in flight) and WARPS W; 'lowbit KIND/"
             "T/S/W' the same over the same entries in a coded cache of that kind (T as CODED_TARGET_PROGRAMS; its "
             "error includes the cache's rounding).", "",
             "| batch | cache positions | position | sdpa (masked, all positions) | "
             + " | ".join(f"lowbit {c}" for c in chunks) + " | sdpa / lowbit (first) | error sdpa | "
             "error lowbit (first) |", "|---:|---:|---:|---:|" + "---:|" * len(chunks) + "---:|---:|---:|"]
    for r in rows:
        first = f"lowbit {chunks[0]}"
        lines.append(f"| {r['batch']} | {r['max_len']} | {r['position']} | {r['sdpa us']:.1f} | "
                     + " | ".join(f"{r[f'lowbit {c} us']:.1f}" for c in chunks)
                     + f" | {r['sdpa us'] / r[first + ' us']:.2f}x | {r['sdpa error']:.1e} | {r[first + ' error']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", nargs="+", default=SETTINGS, help='"TARGET_PROGRAMS/STAGES[/WARPS]" each')
    parser.add_argument("--coded-settings", nargs="+", default=CODED_SETTINGS,
                        help='over a coded cache: "KIND/CODED_TARGET_PROGRAMS/STAGES/WARPS" each '
                        "(KIND int8-token or fp8)")
    args = parser.parse_args()
    SETTINGS[:] = args.settings
    CODED_SETTINGS[:] = args.coded_settings
    run_cases(args.out, itertools.product((1, 16), (256, 1024, 4096), ("first quarter", "last")), run_case, markdown)
