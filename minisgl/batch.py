"""One forward step, described by device tensors: which tokens, at which positions, of which
sequences, and where their keys and values go in the paged KV cache."""

# %% auto #0
__all__ = ['ForwardBatch']

from dataclasses import dataclass

import torch

from minisgl.kv_cache import KVCache, LayerCache


@dataclass
class ForwardBatch:
    """The tokens of one step, packed: sequence i brings `query_len[i]` new tokens that follow the
    `start[i]` tokens it already has in the cache. Prefill is start 0; decode is one new token;
    a chunk of a long prompt is neither, and works the same way.

    Every tensor is on the device and is built once per step, then read by every layer; the
    host ints are shapes known when the batch is built, so no layer asks the device for them."""
    input_ids: torch.Tensor     # [tokens]
    positions: torch.Tensor     # [tokens] position of each token in its sequence
    out_slots: torch.Tensor     # [tokens] KV cache slot that receives each token's key and value
    token_seq: torch.Tensor     # [tokens] which sequence of the batch each token belongs to
    seq_rows: torch.Tensor      # [seqs] page-table row of each sequence
    seq_lens: torch.Tensor      # [seqs] tokens in the cache after this step: start + query_len
    query_starts: torch.Tensor  # [seqs + 1] where each sequence's tokens begin in the packing
    logits_index: torch.Tensor | None  # [seqs] the token each sequence samples from; None: all
    max_query_len: int          # the longest query_len
    max_seq_len: int            # the longest seq_len (or a bound on it)
    is_decode: bool             # every sequence brings exactly one token
    no_prefix: bool             # no sequence has tokens in the cache before this step
    static_shapes: bool = False  # padded to a size every replica agreed on (a CUDA graph's)

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_rows.shape[0]

    @classmethod
    def build(cls, input_ids: list[int] | torch.Tensor, query_lens: list[int], starts: list[int],
              rows: list[int], cache: KVCache | LayerCache, logits: str = "last", device=None,
              upload=None) -> "ForwardBatch":
        """From host lists: `input_ids` packed over the sequences (or already on the device);
        sequence i has `query_lens[i]` new tokens after `starts[i]` cached ones, in page-table
        row `rows[i]`. `logits` is "last" (one row per sequence) or "all" (one per token).
        `upload(list of ints)` puts the index tensors on the device in one copy."""
        token_seq = [i for i, n in enumerate(query_lens) for _ in range(n)]
        positions = [s + j for s, n in zip(starts, query_lens) for j in range(n)]
        seq_lens = [s + n for s, n in zip(starts, query_lens)]
        query_starts = [0]
        for n in query_lens:
            query_starts.append(query_starts[-1] + n)
        parts = [positions, token_seq, rows, seq_lens, query_starts, query_starts[1:]]
        if not isinstance(input_ids, torch.Tensor):
            parts.insert(0, input_ids)
        # One copy to the device for every index tensor of the step.
        values = [v for part in parts for v in part]
        if upload is None:
            flat = torch.tensor(values, dtype=torch.long, device=device)
        else:
            flat = upload(values)
        tensors = list(flat.split([len(part) for part in parts]))
        if isinstance(input_ids, torch.Tensor):
            tensors.insert(0, input_ids)
        ids, positions_t, token_seq_t, rows_t, seq_lens_t, starts_t, ends_t = tensors
        return cls(
            input_ids=ids, positions=positions_t,
            out_slots=cache.slots(rows_t[token_seq_t], positions_t), token_seq=token_seq_t,
            seq_rows=rows_t, seq_lens=seq_lens_t, query_starts=starts_t,
            logits_index=ends_t - 1 if logits == "last" else None,
            max_query_len=max(query_lens, default=0), max_seq_len=max(seq_lens, default=0),
            is_decode=bool(query_lens) and all(n == 1 for n in query_lens),
            no_prefix=not any(starts))

    @classmethod
    def decode(cls, input_ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
               cache: KVCache | LayerCache, max_seq_len: int, static_shapes: bool = False,
               out_slots: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
               order: torch.Tensor | None = None) -> "ForwardBatch":
        """One new token per sequence, from device tensors alone (as a CUDA graph replays it):
        `input_ids`, `rows` and `positions` are [seqs]; `max_seq_len` bounds every sequence's
        length after the step. Pieces already computed on the device (by a fused kernel:
        `out_slots`, `seq_lens`; `order` = arange(seqs + 1)) are used as they are."""
        seqs = rows.shape[0]
        order = torch.arange(seqs + 1, device=rows.device) if order is None else order
        return cls(input_ids=input_ids, positions=positions,
                   out_slots=cache.slots(rows, positions) if out_slots is None else out_slots,
                   token_seq=order[:seqs], seq_rows=rows,
                   seq_lens=positions + 1 if seq_lens is None else seq_lens, query_starts=order,
                   logits_index=order[:seqs], max_query_len=1, max_seq_len=max_seq_len,
                   is_decode=True, no_prefix=False, static_shapes=static_shapes)
