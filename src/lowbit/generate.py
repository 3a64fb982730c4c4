"""Greedy decoding with a static KV cache for Llama-architecture models (Llama, Mistral, Qwen2 and
Qwen3), one token step per call.

Why not `model.generate`: decode speed is what a quantized model is for, and at batch 1 an 8B
model's step is ~5 ms of GPU work but several times that of Python and kernel launches in eager
mode. Every tensor here has a fixed shape (the cache holds `max_len` positions; attention masks
the unwritten ones), and the step reads its token ids and position from device buffers and writes
the next ones back, so a whole step can be captured once as a CUDA graph and replayed per token.
It drives the model's own modules (embedding, rotary embedding, projections), so QuantLinear or
nn.Linear layers run unchanged; the residual adds, norms, rotary products, cache writes and SiLU·up
between them run as one launch each (kernels/decode_ops.py) where the model's norms and activation
are the ones those reproduce, and as the modules otherwise; there attention reads only the cache's
written positions (kernels/decode_attention.py). It works on CPU too (without the graph).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lowbit.kernels import decode_attention, decode_ops
from lowbit.kernels.w4a16 import pending_matmul
from lowbit.kv.row_codes import CODES, CodedCache
from lowbit.kv.spec import KVCacheSpec
from lowbit.modules.merge import merge_linears
from lowbit.modules.quant_linear import QuantLinear

RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
"""Norm classes computing LlamaRMSNorm's arithmetic, which `decode_ops` reproduces."""
SILUS = frozenset({"SiLU", "SiLUActivation"})
"""Activation classes computing F.silu (torch's and transformers' names), which `decode_ops.silu_mul` reproduces."""


PREFILL_TOKENS = 2048
"""Prompt rows (positions times batch) one prefill forward takes: enough for the matmuls to run
at tensor-core rates, few enough that attention's scores over the cache (rows x max_len per
head) stay small."""


class DecodeError(ValueError):
    """The model or the request does not fit the static decoder; the message says what to change."""


class StaticDecoder:
    """Greedy decoder for a `LlamaForCausalLM`-shaped model with a [batch, max_len] static KV cache."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, merge_projections: bool = True,
                 fuse: bool = True, pending_products: bool = True, prefix_attention: bool = True,
                 kv_cache: KVCacheSpec | None = None) -> None:
        """`merge_projections`: run each layer's q/k/v and gate/up projections as one matmul each
        (modules/merge.py; the model's own linears become views of the merged weights, so this
        costs no memory). At batch 1 a step's small matmuls are mostly fixed cost: merged, an
        8B-shaped int4 model decoded 380 against 324 tokens/s on an H200
        (gpu_decode_merged_h200_fused.md against gpu_decode_h200_fused.md).
        `fuse`: the element-wise work between matmuls through decode_ops where the model allows
        (`fused` says whether it does); False runs every module as transformers would.
        `pending_products`: in the fused step, int4 matmuls on lowbit's Gluon kernels leave their
        sums for the decode_ops kernel after them to finish (`_product`); False finishes each matmul.
        `prefix_attention`: in the fused step, attention reads only the cache's written positions
        (kernels/decode_attention.py); False runs torch's SDPA over the whole cache with the
        unwritten positions masked, as the modules' step does.
        `kv_cache`: an int8-token or fp8 spec keeps keys and values as 8-bit codes with a scale per
        position and head (kv/row_codes.py's CodedCache), the cache `lowbit eval --kv-cache KIND`
        scores; None keeps them in the model's dtype. The intN (KIVI) caches are not decoded here."""
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
            raise DecodeError(f"{type(model).__name__} is not a Llama-style causal LM (model.layers, lm_head)")
        config = model.config
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and max_len > window:
            raise DecodeError(f"{type(model).__name__} attends over a sliding window of {window} positions and this "
                              f"decoder over all of them: use max_len <= {window}")
        if kv_cache is not None and kv_cache.kind not in CODES:
            raise DecodeError(f"the static decoder keeps an int8-token or fp8 KV cache or none, not "
                              f"{kv_cache.describe()}; decode with --kv-cache int8-token (`lowbit eval` scores the "
                              "intN caches)")
        self.model, self.inner = model, inner
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.batch, self.max_len = batch, max_len
        weight = inner.embed_tokens.weight
        self.kv_cache = kv_cache
        self.keys = [self._empty_cache(weight) for _ in inner.layers]
        self.values = [self._empty_cache(weight) for _ in inner.layers]
        self.ids = torch.zeros(batch, 1, device=weight.device, dtype=torch.long)
        self.pos = torch.zeros(1, device=weight.device, dtype=torch.long)
        self.logits = torch.zeros(batch, config.vocab_size, device=weight.device, dtype=torch.float32)
        self._positions = torch.arange(max_len, device=weight.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._qkv_sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        self._merged = [self._merge(layer) if merge_projections else (None, None) for layer in inner.layers]
        self.fused = fuse and _fusable(inner)
        self.pending_products = pending_products
        self.prefix_attention = prefix_attention

    def cache_bytes(self) -> int:
        """Bytes the KV cache holds for all layers: entries, and for a coded cache its scales and
        each layer's exact latest entries."""
        stored = [t for cache in self.keys + self.values
                  for t in ((cache.codes, cache.scales, cache.latest) if isinstance(cache, CodedCache) else (cache,))]
        return sum(t.numel() * t.element_size() for t in stored)

    def _empty_cache(self, weight: torch.Tensor) -> torch.Tensor | CodedCache:
        """One layer's keys or values, [batch, kv_heads, max_len, head_dim] in the model's dtype or coded."""
        shape = (self.batch, self.kv_heads, self.max_len, self.head_dim)
        if self.kv_cache is None:
            return torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        return CodedCache.empty(*shape, device=weight.device, dtype=weight.dtype, codes=CODES[self.kv_cache.kind])

    @staticmethod
    def _merge(layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up = merge_linears([mlp.gate_proj, mlp.up_proj]) if _gated(mlp) else None
        return qkv, gate_up

    @torch.no_grad()
    def step(self) -> None:
        """One token: reads `ids` at position `pos`, fills the cache there, writes `logits`, then sets
        `ids` to the greedy next token and advances `pos` (all in place, on the device)."""
        hidden = self.inner.embed_tokens(self.ids)  # [B, 1, H]
        cos, sin = self.inner.rotary_emb(hidden, self.pos.view(1, 1))
        normed = (self._fused_layers(hidden, cos, sin) if self.fused
                  else self._module_layers(hidden, cos, sin, self.pos))
        self.logits.copy_(self.model.lm_head(normed)[:, 0].float())
        self.ids.copy_(self.logits.argmax(dim=-1, keepdim=True))
        self.pos += 1

    @torch.no_grad()
    def _read_prompt(self, ids: torch.Tensor, start: int) -> None:
        """Positions start .. start + T - 1 from ids [B, T] into the cache in one forward through
        the modules (T rows a matmul, causal attention over the cache's first start + T positions);
        no logits: prefill's last position is the step's."""
        end = start + ids.shape[1]
        positions = self._positions[start:end]
        hidden = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(hidden, positions.view(1, -1))
        self._module_layers(hidden, cos, sin, positions, end)
        self.pos.fill_(end)

    def _projections(self, attn: nn.Module, qkv: nn.Module | None, x: torch.Tensor,
                     product: Callable = nn.Module.__call__) -> tuple[torch.Tensor | decode_ops.Pending, ...]:
        """q, k and v of x: one merged matmul by `product` (a plain call, or `_product`) where merged."""
        if qkv is not None:
            return product(qkv, x).split(self._qkv_sizes, dim=-1)
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    def _gate_up(self, mlp: nn.Module, gate_up: nn.Module, x: torch.Tensor,
                 product: Callable = nn.Module.__call__) -> tuple[torch.Tensor | decode_ops.Pending, ...]:
        """gate and up of x, from their merged matmul by `product`."""
        return product(gate_up, x).split([mlp.gate_proj.out_features, mlp.up_proj.out_features], dim=-1)

    def _product(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor | decode_ops.Pending:
        """linear(x), or, where lowbit's kernel for it can leave the product unfinished (a QuantLinear
        without bias on a Gluon path: w4a16.pending_matmul), its pending float32 sums, which the
        decode_ops kernel reading them next rounds and clears: the matmul skips its split-K finish.
        The fused step asks for each product only once the one before it was read, so at most one
        is pending at a time, as pending_matmul requires of products of the same shape."""
        if self.pending_products and isinstance(linear, QuantLinear) and linear.bias is None:
            sums = pending_matmul(x, linear.packed)
            if sums is not None:
                return decode_ops.Pending(sums, x.dtype)
        return linear(x)

    def _module_layers(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       positions: torch.Tensor, attended: int | None = None) -> torch.Tensor:
        """The decoder layers through the model's own modules for hidden [B, T, H] at `positions`
        [T], attending over the cache's first `attended` positions (all of it by default, as a
        captured step must); returns the final norm of the last hidden states."""
        attended = attended or self.max_len
        visible = decode_attention.visible_mask(self._positions[:attended], positions, hidden.dtype)
        tokens = hidden.shape[1]
        for layer, keys, values, (qkv, gate_up) in zip(self.inner.layers, self.keys, self.values, self._merged):
            attn = layer.self_attn
            q, k, v = self._projections(attn, qkv, layer.input_layernorm(hidden))
            q, k = _norm_heads(attn, q, k, self.head_dim)
            q = q.reshape(self.batch, tokens, self.heads, self.head_dim).transpose(1, 2)
            k = k.reshape(self.batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.reshape(self.batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            decode_ops.write_cache(keys, k, positions)
            decode_ops.write_cache(values, v, positions)
            attention = decode_attention.masked_sdpa(q, decode_ops.read_cache(keys, attended, k, positions),
                                                     decode_ops.read_cache(values, attended, v, positions), visible)
            hidden = hidden + attn.o_proj(attention)
            x = layer.post_attention_layernorm(hidden)
            if gate_up is not None:
                gate, up = self._gate_up(layer.mlp, gate_up, x)
                hidden = hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
            else:
                hidden = hidden + layer.mlp(x)
        return self.inner.norm(hidden)

    def _fused_layers(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The same layers with decode_ops between the matmuls: each residual add fused with the
        norm after it (the last one with the model's final norm), and attention over the cache's
        written positions only (decode_attention)."""
        layers = self.inner.layers
        visible = None if self.prefix_attention else decode_attention.visible_mask(self._positions, self.pos,
                                                                                   hidden.dtype)
        first = layers[0].input_layernorm
        x = decode_ops.rms_norm(hidden, first.weight, first.variance_epsilon)
        next_norms = [layer.input_layernorm for layer in layers[1:]] + [self.inner.norm]
        for layer, keys, values, (qkv, gate_up), next_norm in zip(layers, self.keys, self.values, self._merged,
                                                                  next_norms):
            attn, mlp, norm = layer.self_attn, layer.mlp, layer.post_attention_layernorm
            q, k, v = self._projections(attn, qkv, x, self._product)
            q = decode_ops.rotate_into_cache(q, k, v, cos, sin, keys, values, self.pos, _head_norms(attn))
            attended = (decode_attention.attend(q, keys, values, self.pos) if visible is None
                        else decode_attention.masked_sdpa(q, *self._read_at_pos(keys, values), visible))
            hidden, x = decode_ops.add_rms_norm(hidden, self._product(attn.o_proj, attended), norm.weight,
                                                norm.variance_epsilon)
            gate, up = (self._gate_up(mlp, gate_up, x, self._product) if gate_up is not None
                        else (mlp.gate_proj(x), mlp.up_proj(x)))
            hidden, x = decode_ops.add_rms_norm(hidden, self._product(mlp.down_proj, decode_ops.silu_mul(gate, up)),
                                                next_norm.weight, next_norm.variance_epsilon)
        return x

    def _read_at_pos(self, keys: torch.Tensor | CodedCache,
                     values: torch.Tensor | CodedCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole caches as the step at `pos` reads them (for the masked SDPA): a coded cache dequantized."""
        if isinstance(keys, CodedCache):
            return keys.read_at(self.pos), values.read_at(self.pos)
        return keys, values

    def capture(self) -> None:
        """Record one step as a CUDA graph (after two warm-up steps, so kernels are compiled and tuned:
        the first chooses each matmul's kernel, the second makes what the chosen kernels leave their
        products pending in, `_product`).

        The warm-up steps write the cache at the current position; `generate` rewinds `pos` anyway.
        """
        if not self.ids.is_cuda:
            raise DecodeError("CUDA graphs need the model on a CUDA device; decode on CPU without capture()")
        saved = self.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on the capture stream: autotuning and workspaces happen here
                self.pos.copy_(saved)
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.pos.copy_(saved)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, stream=stream):
            self.step()
        self.pos.copy_(saved)

    def _run_step(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        else:
            self.step()

    def prefill(self, prompt: torch.Tensor) -> None:
        """Read prompt [batch, P] into the cache from position 0; `ids` ends as the first new token.

        All but the last position go through the model in chunks of up to PREFILL_TOKENS rows (over
        the batch) a forward, not one position a step: each matmul then reads its weight once for
        the chunk instead of once per position. The last position runs the step (the captured
        graph, if any), so the logits that choose the first new token come from the arithmetic that
        chooses the others."""
        if prompt.shape[0] != self.batch or prompt.shape[1] >= self.max_len:
            raise DecodeError(f"prompt {tuple(prompt.shape)} does not fit batch {self.batch}, max_len {self.max_len}")
        prompt = prompt.to(self.ids.device)
        self.pos.zero_()
        chunk = max(1, PREFILL_TOKENS // self.batch)
        for start in range(0, prompt.shape[1] - 1, chunk):
            self._read_prompt(prompt[:, start : min(start + chunk, prompt.shape[1] - 1)], start)
        self.ids.copy_(prompt[:, -1:])
        self._run_step()

    def decode(self, new_tokens: int) -> torch.Tensor:
        """Greedy tokens [batch, new_tokens] continuing from the current state."""
        if int(self.pos) + new_tokens > self.max_len:
            raise DecodeError(f"{new_tokens} new tokens after position {int(self.pos)} exceed max_len {self.max_len}")
        tokens = torch.empty(self.batch, new_tokens, device=self.ids.device, dtype=torch.long)
        for t in range(new_tokens):
            tokens[:, t : t + 1].copy_(self.ids)
            self._run_step()
        return tokens


def _has_head_norms(attn: nn.Module) -> bool:
    """Whether attention normalises each head of q and k before the rotary embedding (Qwen3's q_norm, k_norm)."""
    return hasattr(attn, "q_norm") and hasattr(attn, "k_norm")


def _norm_heads(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k [..., heads·D] through the attention's per-head norms where it has them, as its own
    forward applies them (over each head's D values); unchanged otherwise."""
    if not _has_head_norms(attn):
        return q, k
    return (attn.q_norm(q.unflatten(-1, (-1, head_dim))).flatten(-2),
            attn.k_norm(k.unflatten(-1, (-1, head_dim))).flatten(-2))


def _head_norms(attn: nn.Module) -> decode_ops.HeadNorms | None:
    """The attention's per-head norms for decode_ops.rotate_into_cache (None without them)."""
    if not _has_head_norms(attn):
        return None
    return decode_ops.HeadNorms(attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.variance_epsilon,
                                attn.k_norm.variance_epsilon)


def _fusable(inner: nn.Module) -> bool:
    """Whether every norm and MLP is one whose arithmetic decode_ops reproduces (RMS_NORMS, SiLU gating)."""
    norms = [inner.norm] + [norm for layer in inner.layers
                            for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms += [norm for layer in inner.layers if _has_head_norms(layer.self_attn)
              for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm)]
    return (all(_gated(layer.mlp) for layer in inner.layers) and all(type(n).__name__ in RMS_NORMS for n in norms)
            and all(type(layer.mlp.act_fn).__name__ in SILUS for layer in inner.layers))


def _gated(mlp: nn.Module) -> bool:
    """Whether the MLP is Llama's down(act(gate(x)) · up(x)), with those modules by those names."""
    return all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
