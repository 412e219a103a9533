"""The decoder forward pass the engine runs: prefill (new prompts) and decode (one token per row).

Numerically this is the transformers Llama forward (same RMSNorm formula, same RoPE tables, same
attention scaling), so greedy outputs match `model.generate`. What differs is the bookkeeping:
- every row has its own position (its length so far): rows joined the batch at different times;
- keys/values go straight into the slot cache (kv_cache.py) — no cache objects, no 4-D masks
  built per layer;
- prefill rows are right-padded: a real token only attends to earlier positions, which are all
  real, so plain causal attention is exact; padded positions are written to the cache but lie
  beyond the row's length, are masked in decode and overwritten by the next real token;
- logits are computed only where a token is sampled (the last prompt position), not for the
  whole prompt;
- an optional `lora` object adds per-row LoRA deltas to every projection (lora.py).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from posttrain.inference.kv_cache import KVCache
from posttrain.inference.weights import DecoderWeights


class RowDeltas(Protocol):
    """Per-row additive deltas for a layer's projection group ("qkv", "o", "gate_up", "down"): one entry
    per output of the group (None where no adapter touches it), or None for the whole group."""

    def delta(self, layer: int, group: str, x: torch.Tensor) -> list[torch.Tensor | None] | None: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _mlp(w: DecoderWeights, i: int, x: torch.Tensor, lora: RowDeltas | None) -> torch.Tensor:
    layer = w.layers[i]
    h = rms_norm(x, layer.post_norm, w.dims.eps)
    gate, up = layer.gate_up(h, lora.delta(i, "gate_up", h) if lora else None)
    h = F.silu(gate) * up
    (out,) = layer.down(h, lora.delta(i, "down", h) if lora else None)
    return x + out


def _qkv(w: DecoderWeights, i: int, x: torch.Tensor, positions: torch.Tensor, lora: RowDeltas | None):
    """q [B,H,T,D] and k, v [B,KVH,T,D], RoPE applied, for hidden states x [B,T,hidden]."""
    d = w.dims
    layer = w.layers[i]
    h = rms_norm(x, layer.input_norm, d.eps)
    q, k, v = layer.qkv(h, lora.delta(i, "qkv", h) if lora else None)
    b, t = x.shape[:2]
    cos, sin = w.cos[positions].unsqueeze(2), w.sin[positions].unsqueeze(2)  # [B,T,1,D]
    q = _rotate(q.view(b, t, d.num_heads, d.head_dim), cos, sin).transpose(1, 2)
    k = _rotate(k.view(b, t, d.num_kv_heads, d.head_dim), cos, sin).transpose(1, 2)
    v = v.view(b, t, d.num_kv_heads, d.head_dim).transpose(1, 2)
    return q, k, v


def _attn_out(w: DecoderWeights, i: int, x: torch.Tensor, attn: torch.Tensor, lora: RowDeltas | None) -> torch.Tensor:
    b, _, t, _ = attn.shape
    attn = attn.transpose(1, 2).reshape(b, t, w.dims.q_size)
    (out,) = w.layers[i].o(attn, lora.delta(i, "o", attn) if lora else None)
    return x + out


def _logits(w: DecoderWeights, x: torch.Tensor) -> torch.Tensor:
    return F.linear(rms_norm(x, w.final_norm, w.dims.eps), w.lm_head).float()


def prefill(w: DecoderWeights, cache: KVCache, embeds: torch.Tensor, lengths: torch.Tensor, first_slot: int,
            lora: RowDeltas | None = None, prefix=None) -> torch.Tensor:
    """Run right-padded prompts embeds [B,T,hidden] (row b real for its first lengths[b] positions)
    into cache slots first_slot..first_slot+B-1; returns logits [B,vocab] at each row's last position.

    `prefix` (prefix tuning, shared by all rows): per-layer keys/values [layers, KVH, P, D] that sit in
    front of the prompt as cache positions 0..P-1; the prompt then starts at position P."""
    b, t, _ = embeds.shape
    p = prefix.num_virtual_tokens if prefix is not None else 0
    cache.ensure_length(p + t)
    positions = torch.arange(p, p + t, device=embeds.device).expand(b, t)
    slots = slice(first_slot, first_slot + b)
    mask = None
    if p:  # every prompt position sees the whole prefix, then the prompt causally
        q_pos = torch.arange(t, device=embeds.device)[:, None]
        k_pos = torch.arange(p + t, device=embeds.device)[None, :]
        mask = (k_pos < p) | (k_pos - p <= q_pos)
    x = embeds
    for i in range(w.dims.num_layers):
        q, k, v = _qkv(w, i, x, positions, lora)
        if p:
            cache.keys(i)[slots, :, :p] = prefix.keys[i]
            cache.values(i)[slots, :, :p] = prefix.values[i]
        cache.keys(i)[slots, :, p:p + t] = k
        cache.values(i)[slots, :, p:p + t] = v
        if p:
            attn = F.scaled_dot_product_attention(q, cache.keys(i)[slots, :, :p + t], cache.values(i)[slots, :, :p + t],
                                                  attn_mask=mask, enable_gqa=True)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = _attn_out(w, i, x, attn, lora)
        x = _mlp(w, i, x, lora)
    last = x[torch.arange(b, device=x.device), lengths - 1]
    return _logits(w, last)


def decode(w: DecoderWeights, cache: KVCache, token_ids: torch.Tensor, positions: torch.Tensor, max_len: int,
           lora: RowDeltas | None = None) -> torch.Tensor:
    """One new token per row for rows in slots 0..B-1: token_ids [B] at positions [B] (each row's length so
    far); `max_len` = max(positions) + 1. Returns logits [B,vocab]."""
    b = token_ids.shape[0]
    x = F.embedding(token_ids, w.embed).unsqueeze(1)  # [B,1,hidden]
    rows = torch.arange(b, device=x.device)
    visible = (torch.arange(max_len, device=x.device)[None, :] <= positions[:, None]).view(b, 1, 1, max_len)
    pos = positions.unsqueeze(1)
    for i in range(w.dims.num_layers):
        q, k, v = _qkv(w, i, x, pos, lora)
        keys, values = cache.keys(i), cache.values(i)
        keys[rows, :, positions] = k[:, :, 0]
        values[rows, :, positions] = v[:, :, 0]
        attn = F.scaled_dot_product_attention(q, keys[:b, :, :max_len], values[:b, :, :max_len],
                                              attn_mask=visible, enable_gqa=True)
        x = _attn_out(w, i, x, attn, lora)
        x = _mlp(w, i, x, lora)
    return _logits(w, x[:, 0])
