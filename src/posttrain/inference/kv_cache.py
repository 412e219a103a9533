"""A slot-per-sequence KV cache that grows on demand and stays compact.

Running sequences always occupy slots 0..n-1, so a decode step reads `keys[:n, :, :L]` as a view
with no gather. When a sequence finishes, the last running sequence moves into its slot (one copy
of its KV rows), and the freed slot is immediately reusable. The length axis starts small and
doubles when a sequence needs more, up to the model's maximum, so memory follows actual use.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, initial_len: int = 256):
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.max_len = max_len
        # keys and values of all layers in one tensor: [layer, k/v, slot, kv_head, position, head_dim]
        self.shape_tail = (num_kv_heads, head_dim)
        self.data = torch.zeros(num_layers, 2, max_slots, num_kv_heads, min(initial_len, max_len), head_dim,
                                dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.data.shape[4]

    def ensure_length(self, needed: int) -> None:
        """Make room for positions [0, needed) in every slot (doubling, capped at max_len)."""
        if needed <= self.capacity:
            return
        if needed > self.max_len:
            raise ValueError(f"KV cache needs {needed} positions but the model allows {self.max_len}")
        new_len = self.capacity
        while new_len < needed:
            new_len *= 2
        new_len = min(new_len, self.max_len)
        grown = self.data.new_zeros(*self.data.shape[:4], new_len, self.data.shape[5])
        grown[:, :, :, :, :self.capacity] = self.data
        self.data = grown

    def keys(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (all layers at once)."""
        self.data[:, :, dst, :, :length] = self.data[:, :, src, :, :length]

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
