"""End-to-end decode speed: a Llama-3-8B-shaped model with int4 QuantLinear layers vs the same in bf16.

Random bf16 weights with Llama-3-8B's shapes (or Qwen3-8B's, `--family qwen3-8b`), built on the
GPU (values do not change the work).
Every decoder Linear is rounded to int4 asymmetric group 128 (RTN) and, for the bf16 run, replaced
by its dequantized value, so both models compute the same function; the int4 run swaps those
Linears for QuantLinear (packed codes, W4A16 Triton kernels). Embedding and lm_head stay bf16 in
both. Decoding is lowbit.generate.StaticDecoder: a static KV cache and one CUDA graph per token
step, with the element-wise work between matmuls fused (decode_ops) or run as the modules
(--steps, both by default; `fused-finished` is the fused step without pending matmul products,
StaticDecoder(pending_products=False)); a prompt of --prompt random tokens, then --new greedy tokens timed
(synchronised wall clock).
Accuracy check: the logits at the end of the prompt from a float32 copy of the same (dequantized)
model are the reference for those of the captured step reading the prompt's last position (as
StaticDecoder.prefill ends, after the rest in chunks through the modules); the int4 model's relative error must stay
within 1.5x the bf16 model's (random weights amplify rounding through 32 layers, so both errors
are percent-level and only their ratio says whether the int4 path is as exact as bf16 cuBLAS).

    python benchmarks/gpu_decode.py --out benchmarks/results/gpu_decode
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_model import llama3_8b_config, qwen3_8b_config  # noqa: E402

from lowbit.formats.base import quantize_matrix  # noqa: E402
from lowbit.formats.integer import IntegerFormat  # noqa: E402
from lowbit.generate import StaticDecoder  # noqa: E402
from lowbit.kernels.w4a16 import PATHS, path_table, use_paths  # noqa: E402
from lowbit.kv.spec import KVCacheSpec  # noqa: E402
from lowbit.modules import QuantLinear  # noqa: E402

FMT = IntegerFormat(bits=4, symmetric=False, group_size=128)
MAX_ERROR_RATIO = 1.5


FAMILIES = {"llama3-8b": ("Llama-3-8B", LlamaConfig, LlamaForCausalLM, llama3_8b_config),
            "qwen3-8b": ("Qwen3-8B", Qwen3Config, Qwen3ForCausalLM, qwen3_8b_config)}
"""--family: (name, config class, model class, the config of its shapes)."""


def build(layers: int | None, family: str = "llama3-8b", device: str | torch.device = "cuda") -> nn.Module:
    """The random model of the family's shapes in bf16 (its own depth unless `layers`), built on `device`."""
    _, config_class, model_class, shapes = FAMILIES[family]
    config = shapes(config_class) if layers is None else shapes(config_class, layers)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


@torch.no_grad()
def quantize_in_place(model: nn.Module, head: bool = False) -> dict[str, QuantLinear]:
    """Set every decoder Linear (and lm_head with `head`) to its int4 RTN value; return the
    QuantLinear for each, by module name (not yet swapped)."""
    packed = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name.startswith("model.layers.") or (head and name == "lm_head")):
            qweight = quantize_matrix(FMT, module.weight.float())
            module.weight.copy_(qweight.dequantize().to(module.weight.dtype))
            packed[name] = QuantLinear.from_quantized(qweight).to("cuda")
            del qweight
    return packed


def swap(model: nn.Module, packed: dict[str, QuantLinear]) -> None:
    for name, module in packed.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    torch.cuda.empty_cache()


@torch.no_grad()
def float32_logits(model: nn.Module, prompt: torch.Tensor, batches: list[int]) -> dict[int, torch.Tensor]:
    """Logits after each batch's prompt from a float32 copy of `model` (eager steps, no graph)."""
    reference = copy.deepcopy(model).float()
    logits = {}
    for b in batches:
        decoder = StaticDecoder(reference, batch=b, max_len=prompt.shape[1] + 1, merge_projections=False,
                                fuse=False)  # transformers' arithmetic
        decoder.prefill(prompt[:b])
        logits[b] = decoder.logits.double()
    del reference, decoder
    torch.cuda.empty_cache()
    return logits


STEPS = {"fused": {"fuse": True}, "fused-finished": {"fuse": True, "pending_products": False},
         "fused-sdpa": {"fuse": True, "prefix_attention": False}, "modules": {"fuse": False},
         "fused-fp8": {"fuse": True, "kv_cache": KVCacheSpec(kind="fp8")},
         "fused-int8-token": {"fuse": True, "kv_cache": KVCacheSpec(kind="int8-token")}}
"""--steps: how the work between matmuls runs (StaticDecoder's settings). "fused-finished" is the
fused step with every int4 matmul finishing its own product (no pending split-K sums); "fused-sdpa"
the fused step with torch's SDPA over the whole cache, the unwritten positions masked; "fused-fp8"
and "fused-int8-token" the fused step over that coded KV cache (in the bf16 run too)."""


def time_decode(model: nn.Module, batch: int, prompt: torch.Tensor, new: int, merge: bool = False,
                fuse: bool = True, pending_products: bool = True, prefix_attention: bool = True,
                kv_cache: KVCacheSpec | None = None) -> dict:
    decoder = StaticDecoder(model, batch=batch, max_len=prompt.shape[1] + new + 8, merge_projections=merge, fuse=fuse,
                            pending_products=pending_products, prefix_attention=prefix_attention, kv_cache=kv_cache)
    assert decoder.fused == fuse, "the model's norms or activation are not the ones decode_ops reproduces"
    decoder.capture()
    decoder.prefill(prompt[:batch])  # warm-up too: the prompt's shapes compiled and tuned
    logits = decoder.logits.clone()  # from the captured step, which reads the prompt's last position
    decoder.decode(8)  # replay warm-up
    prefill_by_steps = timed(lambda: read_prompt_by_steps(decoder, prompt[:batch]))
    prefill = timed(lambda: decoder.prefill(prompt[:batch]))
    start = time.perf_counter()
    tokens = decoder.decode(new)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"batch": batch, "new_tokens": new, "seconds": seconds, "tokens_per_s": batch * new / seconds,
            "ms_per_step": 1e3 * seconds / new, "prefill_ms": 1e3 * prefill,
            "prefill_by_steps_ms": 1e3 * prefill_by_steps, "logits": logits, "tokens": tokens.cpu()}


def timed(work) -> float:
    """Seconds `work` takes on the GPU (synchronised wall clock)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def read_prompt_by_steps(decoder: StaticDecoder, prompt: torch.Tensor) -> None:
    """The prompt one position a captured step, as StaticDecoder.prefill read it before it took chunks."""
    decoder.pos.zero_()
    for t in range(prompt.shape[1]):
        decoder.ids.copy_(prompt[:, t : t + 1])
        decoder._run_step()


@torch.no_grad()
def kernel_profile(model: nn.Module, prompt: torch.Tensor, merge: bool, fuse: bool,
                   pending_products: bool = True, prefix_attention: bool = True,
                   kv_cache: KVCacheSpec | None = None) -> list[dict]:
    """The GPU kernels of one batch-1 step run eagerly (a graph replays the same ones): per kernel
    name, launches and GPU microseconds, most time first."""
    from torch.profiler import ProfilerActivity, profile

    decoder = StaticDecoder(model, batch=1, max_len=prompt.shape[1] + 8, merge_projections=merge, fuse=fuse,
                            pending_products=pending_products, prefix_attention=prefix_attention, kv_cache=kv_cache)
    decoder.prefill(prompt[:1])
    decoder.step()  # warm-up: the step's kernels compiled and tuned
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.step()
        torch.cuda.synchronize()
    kernels = [{"kernel": e.key, "calls": e.count, "us": e.device_time_total}
               for e in prof.key_averages() if e.device_time_total > 0 and e.count]
    return sorted(kernels, key=lambda k: -k["us"])


def profile_markdown(profile: dict) -> list[str]:
    lines = []
    for step, kernels in profile.items():
        calls, total = sum(k["calls"] for k in kernels), sum(k["us"] for k in kernels)
        lines += ["", f"Kernels of one batch-1 int4 step, {step} (eager; {calls} launches, "
                  f"{total:.0f} us of GPU time):",
                  "", "| kernel | launches | GPU us |", "|---|---:|---:|"]
        lines += [f"| {k['kernel'][:90].replace('|', '/')} | {k['calls']} | {k['us']:.0f} |" for k in kernels[:15]]
    return lines


def markdown(result: dict) -> str:
    meta = result["meta"]
    steps = any("step" in row for row in result["rows"])  # files from before the fused step have one kind
    prefill = all("prefill_ms" in row["int4"] for row in result["rows"])  # and from before chunked prompts
    lines = [f"Greedy decode of a random {meta.get('family', 'Llama-3-8B')}-shaped model ({meta['layers']} layers), "
             f"prompt {meta['prompt']} "
             f"tokens then {meta['new']} timed tokens, static KV cache, one CUDA graph per step, on "
             f"{meta['device']} (torch {meta['torch']}). int4: every decoder Linear as QuantLinear (asym g128); "
             + ("lm_head too (in the bf16 run, its rounded value in bf16); embedding bf16 in both."
                if meta.get("quantized_head") else "embedding and lm_head bf16 in both.")
             + {True: " q/k/v and gate/up merged into one matmul each, in both.",
                False: " q/k/v and gate/up as separate matmuls, in both."}.get(meta.get("merged_projections"), "")
             + (" Step: `modules` runs the model's norms, rotary embedding and MLP activation as transformers does; "
                "`fused` runs them through lowbit.kernels.decode_ops (each residual add with the norm after it, "
                "rotary embedding with the cache write, SiLU with the product, one launch each), and there each "
                "int4 matmul on a Gluon kernel leaves its float32 sums for the kernel after it to finish; "
                "`fused-finished` is `fused` with every matmul finishing its own product." if steps else "")
             + (" In `fused` and `fused-finished`, attention reads only the cache's written positions "
                "(lowbit.kernels.decode_attention); `fused-sdpa` is `fused` with torch's SDPA over the whole cache, "
                "the unwritten positions masked." if meta.get("decode_attention") else "")
             + (" `fused-fp8` and `fused-int8-token` are `fused` with keys and values cached as float8 e4m3 or "
                "symmetric int8 with a scale per token and head (bf16 and int4 runs alike; their logits error "
                "includes the cache's)." if any("kv_cache" in STEPS.get(row.get("step"), {}) for row in result["rows"])
                else "")
             + (f" Prompt ms: StaticDecoder.prefill reading the {meta['prompt']}-token prompt in chunks through the "
                "modules (one forward a chunk), and, for int4, the same prompt one position a captured step, "
                "as prefill read it before." if prefill else ""),
             "",
             "| batch |" + (" step |" if steps else "") + " bf16 tokens/s | int4 tokens/s | speed-up | bf16 ms/step | "
             f"int4 ms/step | bf16 logits err | int4 logits err | check (int4 <= {MAX_ERROR_RATIO} x bf16) | "
             "same greedy tokens |" + (" bf16 prompt ms | int4 prompt ms | int4 prompt ms, a step a position |"
                                       if prefill else ""),
             "|---:|" + ("---|" if steps else "") + "---:|---:|---:|---:|---:|---:|---:|---|---:|"
             + ("---:|---:|---:|" if prefill else "")]
    if meta.get("paths"):
        lines.insert(1, "Matmul paths the dispatcher chose (M bucket, N x K): " + "; ".join(meta["paths"]) + ".")
        lines.insert(1, "")
    for row in result["rows"]:
        lines.append(f"| {row['batch']} | " + (f"{row['step']} | " if steps else "")
                     + f"{row['bf16']['tokens_per_s']:.0f} | {row['int4']['tokens_per_s']:.0f} | "
                     f"{row['int4']['tokens_per_s'] / row['bf16']['tokens_per_s']:.2f}x | "
                     f"{row['bf16']['ms_per_step']:.2f} | {row['int4']['ms_per_step']:.2f} | "
                     f"{row['bf16_logits_err']:.1e} | {row['int4_logits_err']:.1e} | "
                     f"{'pass' if row['int4_logits_err'] <= MAX_ERROR_RATIO * row['bf16_logits_err'] else 'FAIL'} | "
                     f"{row['same_tokens']:.0%} |"
                     + (f" {row['bf16']['prefill_ms']:.1f} | {row['int4']['prefill_ms']:.1f} | "
                        f"{row['int4']['prefill_by_steps_ms']:.1f} |" if prefill else ""))
    lines += profile_markdown(result.get("profile", {}))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=tuple(FAMILIES), default="llama3-8b", help="the model's shapes")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the family's, 32 or 36)")
    parser.add_argument("--quantize-head", action="store_true", help="lm_head as int4 QuantLinear too")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=[],
                        help="W4A16 matmul paths the dispatcher may choose among (default all available)")
    parser.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                        help="q/k/v and gate/up as one matmul each, in both the bf16 and the int4 run "
                        "(StaticDecoder's default; --no-merge runs them separately)")
    parser.add_argument("--steps", nargs="+", choices=tuple(STEPS), default=["fused", "modules"],
                        help="how the element-wise work between matmuls runs (StaticDecoder(fuse=...)), "
                        "each in the same call")
    parser.add_argument("--profile", action="store_true",
                        help="also list the GPU kernels of one batch-1 int4 step per --steps kind (torch.profiler)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = parser.parse_args()
    if args.render:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return
    use_paths(*args.paths)
    model = build(args.layers, args.family)
    packed = quantize_in_place(model, args.quantize_head)
    prompt = torch.randint(0, model.config.vocab_size, (max(args.batches), args.prompt), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(1))
    reference = float32_logits(model, prompt, args.batches)
    cases = [(b, step) for b in args.batches for step in args.steps]
    bf16 = {case: time_decode(model, case[0], prompt, args.new, args.merge, **STEPS[case[1]]) for case in cases}
    swap(model, packed)
    rows = []
    for b, step in cases:
        int4 = time_decode(model, b, prompt, args.new, args.merge, **STEPS[step])
        errors = {kind: float((run["logits"].double() - reference[b]).norm() / reference[b].norm())
                  for kind, run in (("bf16", bf16[b, step]), ("int4", int4))}
        if errors["int4"] > MAX_ERROR_RATIO * errors["bf16"]:  # reported in the table's check column, not hidden
            print(f"batch {b}, {step} step: int4 logits error {errors['int4']:.2e} exceeds {MAX_ERROR_RATIO} x "
                  f"bf16's {errors['bf16']:.2e}", flush=True)
        same = float((int4["tokens"] == bf16[b, step]["tokens"]).float().mean())
        strip = lambda r: {k: v for k, v in r.items() if k not in ("logits", "tokens")}  # noqa: E731
        rows.append({"batch": b, "step": step, "bf16": strip(bf16[b, step]), "int4": strip(int4),
                     "bf16_logits_err": errors["bf16"], "int4_logits_err": errors["int4"], "same_tokens": same})
        print(json.dumps(rows[-1]), flush=True)
    profiles = {step: kernel_profile(model, prompt, args.merge, **STEPS[step]) for step in args.steps} \
        if args.profile else {}
    result = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "family": FAMILIES[args.family][0], "layers": model.config.num_hidden_layers,
                       "quantized_head": args.quantize_head,
                       "merged_projections": args.merge, "decode_attention": True,
                       "prompt": args.prompt, "new": args.new, "date": time.strftime("%Y-%m-%d %H:%M"),
                       "paths": sorted({f"M<={key[2]} {key[3]}x{key[4]}: {path}" for key, path in path_table().items()})},
              "rows": rows, **({"profile": profiles} if profiles else {})}
    text = markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
