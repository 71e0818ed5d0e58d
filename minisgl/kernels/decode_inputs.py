"""A decode step's per-sequence inputs in one kernel: each row's last token, the slot its key goes to,
and its length after the step (chapter 10)."""

# %% auto #0
__all__ = ['decode_inputs']

import torch
import triton
import triton.language as tl

from .pdl import pdl_options, pdl_wait


@triton.jit
def _decode_inputs_kernel(rows_ptr, positions_ptr, last_tokens_ptr, page_table_ptr, ids_ptr, slots_ptr,
                          lens_ptr, seqs, page_table_stride, PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr,
                          PDL: tl.constexpr):
    pdl_wait(PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < seqs
    row = tl.load(rows_ptr + i, mask=mask, other=0)
    position = tl.load(positions_ptr + i, mask=mask, other=0)
    page = tl.load(page_table_ptr + row * page_table_stride + position // PAGE_SIZE, mask=mask, other=0)
    tl.store(ids_ptr + i, tl.load(last_tokens_ptr + row, mask=mask, other=0), mask=mask)
    tl.store(slots_ptr + i, page.to(tl.int64) * PAGE_SIZE + position % PAGE_SIZE, mask=mask)
    tl.store(lens_ptr + i, position + 1, mask=mask)


def decode_inputs(rows: torch.Tensor, positions: torch.Tensor, last_tokens: torch.Tensor,
                  page_table: torch.Tensor, page_size: int):
    """rows, positions [seqs] -> (input ids, cache slots, lengths after the step), each [seqs]: what
    `last_tokens[rows]`, `page_slots(...)` and `positions + 1` give, in one launch instead of eight."""
    seqs = rows.shape[0]
    ids, slots, lens = (torch.empty_like(positions) for _ in range(3))
    if seqs:
        block = min(1024, triton.next_power_of_2(seqs))
        _decode_inputs_kernel[(triton.cdiv(seqs, block),)](
            rows, positions, last_tokens, page_table, ids, slots, lens, seqs, page_table.stride(0),
            PAGE_SIZE=page_size, BLOCK=block, **pdl_options(positions))
    return ids, slots, lens
