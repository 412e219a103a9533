"""Decode steps replayed from captured CUDA graphs.

A decode step of a small or mid-sized model on a GPU is bound by kernel launches, not math: the
H100 profile of the bench's model showed ~380 ms of host time per 32 steps against ~32 ms of GPU
work. Capturing the step once and replaying it costs one launch. A graph needs fixed shapes and
fixed memory, so:
- the batch is padded up to a bucket (1, 2, 4, 8, ... max_batch_size). The padding rows decode
  token 0 at position 0 into the slots just past the running rows: those slots are free during a
  decode (running rows fill slots 0..n-1, rows admitted this step prefill after the decode and
  overwrite them), so the padding never touches a live row;
- the attention span is a power-of-two bucket of the longest row (at most the cache's capacity);
  the per-row mask hides everything past a row's own length, as in the eager step;
- inputs go through two persistent buffers (tokens, positions); the KV cache and the weights are
  read in place, so the weights of a model that is still training (RL) are current at each replay.
  A graph is dropped when the cache grows (new memory); weights are never reallocated by training
  (optimizers update in place).
Steps with LoRA rows run eagerly (their per-row adapter indices are not captured).
"""

from __future__ import annotations

import torch

from posttrain.inference import forward
from posttrain.inference.kv_cache import KVCache
from posttrain.inference.weights import DecoderWeights

MIN_SPAN = 64  # smallest attention-span bucket: fewer graphs for short sequences, negligible extra work


def _bucket(n: int, cap: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return min(size, cap)


class DecodeGraphs:
    def __init__(self, weights: DecoderWeights, cache: KVCache, max_batch_size: int):
        self.weights, self.cache = weights, cache
        self.max_batch_size = max_batch_size
        self.tokens = torch.zeros(max_batch_size, dtype=torch.long, device=weights.device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.long, device=weights.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.cache_data = cache.data

    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, max_len: int) -> torch.Tensor:
        """forward.decode for rows in slots 0..B-1, replayed from a graph; logits [B, vocab] (valid until the
        next call)."""
        b = token_ids.shape[0]
        if self.cache.data is not self.cache_data:  # the cache grew: the graphs read the old memory
            self.graphs.clear()
            self.pool = torch.cuda.graph_pool_handle()  # the old pool died with its last graph; it takes no more
            self.cache_data = self.cache.data
        rows = _bucket(b, self.max_batch_size)
        span = _bucket(max(max_len, MIN_SPAN), self.cache.capacity)
        self.tokens[:b].copy_(token_ids)
        self.tokens[b:rows].zero_()
        self.positions[:b].copy_(positions)
        self.positions[b:rows].zero_()
        key = (rows, span)
        if key not in self.graphs:
            self.graphs[key] = self._capture(rows, span)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:b]

    def _capture(self, rows: int, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        tokens, positions = self.tokens[:rows], self.positions[:rows]
        # Warm up on a side stream first (lazy initialisations must not be captured), as PyTorch advises.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward.decode(self.weights, self.cache, tokens, positions, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = forward.decode(self.weights, self.cache, tokens, positions, span)
        return graph, logits
