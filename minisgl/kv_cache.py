"""The KV cache: keys and values of every layer in fixed-size pages, and a page table per sequence."""

# %% auto #0
__all__ = ['page_slots', 'LayerCache', 'KVCache']

import math
from dataclasses import dataclass

import torch


def page_slots(page_table: torch.Tensor, page_size: int, rows: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
    "The cache slot of each (row, position): its page's first slot plus its offset in the page."
    pages = page_table[rows, positions // page_size].long()
    return pages * page_size + positions % page_size


@dataclass(frozen=True)
class LayerCache:
    "One layer's view of the cache: what attention reads and writes."
    k: torch.Tensor           # [local kv heads, slots, head_dim]
    v: torch.Tensor           # [local kv heads, slots, head_dim]
    page_table: torch.Tensor  # [rows, pages per row] int32: page i of the sequence in each row
    page_size: int

    def slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return page_slots(self.page_table, self.page_size, rows, positions)


class KVCache:
    """Keys and values of every layer, in pages of `page_size` token slots, on this rank's KV heads.

    `k` and `v` are [layers, local kv heads, num_pages * page_size, head_dim]: within a head, the
    slots of a page are contiguous, so reading a page's keys is one contiguous read. A sequence owns a row
    of `page_table` [rows, pages per row]: entry i is the page that holds its positions
    [i * page_size, (i + 1) * page_size). Whoever hands out pages writes them there; attention finds
    a sequence's keys through its row. Page 0 and the last row are kept aside as scratch: a padding
    sequence (a batch padded to a fixed size) reads and writes them and nothing else."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, max_rows: int, max_seq_len: int, dtype=torch.float32,
                 device=None):
        if num_pages < 2 or page_size < 1 or max_rows < 1:
            raise ValueError(f"a KV cache needs >= 2 pages of >= 1 slot and >= 1 row, got "
                             f"{num_pages} pages of {page_size}, {max_rows} rows")
        self.num_pages, self.page_size = num_pages, page_size
        self.max_rows, self.max_seq_len = max_rows, max_seq_len
        shape = (num_layers, num_kv_heads, num_pages * page_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pages_per_row = math.ceil(max_seq_len / page_size)
        # One row more than asked for: the scratch row of padding sequences, all on page 0.
        self.page_table = torch.zeros(max_rows + 1, self.pages_per_row, dtype=torch.int32,
                                      device=device)
        self.scratch_row = max_rows
        self.layers = [LayerCache(self.k[i], self.v[i], self.page_table, page_size) for i in range(num_layers)]

    def slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return page_slots(self.page_table, self.page_size, rows, positions)

    def layer(self, idx: int) -> LayerCache:
        return self.layers[idx]

    @property
    def bytes_per_token(self) -> int:
        "Bytes one cached token takes on this rank, over all layers, keys and values."
        layers, heads, _, dim = self.k.shape
        return 2 * layers * heads * dim * self.k.element_size()
