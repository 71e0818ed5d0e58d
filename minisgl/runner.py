"""The model runner: one forward step of one rank's model. It owns the KV cache, turns a step
described on the host into a ForwardBatch, runs the model, samples, and keeps each sequence's
latest token on the device for the next step."""

# %% auto #0
__all__ = ['DEFAULT_DECODE_SIZES', 'ModelRunner']

import torch

from minisgl.batch import ForwardBatch
from minisgl.model import Qwen3MoeForCausalLM
from minisgl.sampling import SamplingTensors, sample

# The batch sizes a decode step is padded to (and, on a GPU, captured as CUDA graphs at).
DEFAULT_DECODE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class _Uploader:
    """Host lists of ints to the device, one copy each, without stalling the host: a small ring of
    pinned buffers, each reused only once the device has read it (its event has passed)."""

    def __init__(self, device: torch.device, depth: int = 4, capacity: int = 1 << 16):
        self.device, self.pinned = device, device.type == "cuda"
        self.buffers, self.events, self.next = [], [], 0
        if self.pinned:
            self.buffers = [torch.empty(capacity, dtype=torch.long, pin_memory=True) for _ in range(depth)]
            self.events = [None] * depth

    def __call__(self, values: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        "The values as a device tensor (into `out` if given, which must hold exactly that many)."
        if not self.pinned or len(values) > self.buffers[0].numel():
            host = torch.tensor(values, dtype=torch.long)
            return host.to(self.device) if out is None else out.copy_(host)
        i = self.next
        self.next = (i + 1) % len(self.buffers)
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy that last used this buffer has been made
        staging = self.buffers[i][:len(values)]
        staging.copy_(torch.tensor(values, dtype=torch.long))
        if out is None:
            out = staging.to(self.device, non_blocking=True)
        else:
            out.copy_(staging, non_blocking=True)
        self.events[i] = torch.cuda.Event()
        self.events[i].record()
        return out


class ModelRunner:
    """Runs steps of a model on this rank, reference or fast: the model's ops decide how.

    Sequences live in rows of the KV cache's page table; whoever schedules them writes their pages
    there. A decode step of n sequences runs padded to the smallest of `decode_sizes` that holds
    n (the scratch row fills the rest), so that every replica can run it with the same shapes, and,
    on a GPU, as a CUDA graph (the GraphRunner of Part II)."""

    def __init__(self, model: Qwen3MoeForCausalLM, num_pages: int, page_size: int, max_rows: int,
                 max_seq_len: int | None = None, decode_sizes: tuple[int, ...] = ()):
        self.model, self.ctx, self.device = model, model.ctx, model.ctx.device
        self.cache = model.make_kv_cache(num_pages, page_size, max_rows, max_seq_len)
        self.max_seq_len = self.cache.max_seq_len
        self.decode_sizes = tuple(sorted(decode_sizes))
        # The token each row sampled last: the next decode step's input, never read by the host.
        self.last_tokens = torch.zeros(max_rows + 1, dtype=torch.long, device=self.device)
        self.upload = _Uploader(self.device)
        self.step_rows = self.step_next_positions = None

    def padded_size(self, seqs: int) -> int:
        "The size a decode step of `seqs` sequences runs at: every replica must ask with the same seqs."
        return next((size for size in self.decode_sizes if size >= seqs), seqs)

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        "Logits of the batch; remembers its rows and next positions for `sample`."
        self.step_rows, self.step_next_positions = batch.seq_rows, batch.seq_lens
        return self.model(batch, self.cache)

    def extend(self, input_ids: list[int], query_lens: list[int], starts: list[int], rows: list[int],
               logits: str = "last") -> torch.Tensor:
        "Sequence i brings query_lens[i] tokens after starts[i] cached ones (prefill: starts 0)."
        return self.forward(ForwardBatch.build(input_ids, query_lens, starts, rows, self.cache, logits,
                                               self.device, self.upload))

    def decode_batch(self, rows: list[int], positions: list[int], size: int | None = None
                     ) -> ForwardBatch:
        "One token per sequence, each the row's last sampled token, padded to `size` sequences."
        size = max(size or 0, len(rows))
        pad = size - len(rows)
        flat = self.upload(rows + [self.cache.scratch_row] * pad + positions + [0] * pad)
        rows_t, positions_t = flat[:size], flat[size:]
        return ForwardBatch.decode(self.last_tokens[rows_t], rows_t, positions_t, self.cache,
                                   max(positions, default=0) + 1, size in self.decode_sizes)

    def decode(self, rows: list[int], positions: list[int], size: int | None = None) -> torch.Tensor:
        "Logits [len(rows), vocab] of one decode step; `size` as `padded_size` gave it."
        return self.forward(self.decode_batch(rows, positions, size))[:len(rows)]

    def sample(self, logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
        """Next tokens [n] of the last step's first n sequences (n = logits rows); they become
        those rows' inputs of the next decode step."""
        n = logits.shape[0]
        rows = self.step_rows[:n]
        next_ids = sample(logits, params, self.step_next_positions[:n])
        self.last_tokens[rows] = next_ids
        return next_ids
