"""Decode steps replayed as CUDA graphs: captured once at start-up, for every padded batch size the
runner will serve, largest first, in one shared memory pool."""

# %% auto #0
__all__ = ['GraphRunner']

import torch

from minisgl.batch import ForwardBatch
from minisgl.kernels.decode_inputs import decode_inputs
from minisgl.runner import ModelRunner


class GraphRunner(ModelRunner):
    """A ModelRunner whose decode steps are CUDA graphs: one launch per step instead of ~500.

    `capture()` (at start-up, on every rank together: the graphs hold the collectives) records one
    graph per size in `decode_sizes`. A decode step then copies its rows and positions into the
    graph's input buffers and replays it; the graph gathers each row's last token, builds the
    batch, runs the model and leaves the logits in its output buffer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        largest = max(self.decode_sizes, default=0)
        # The graphs' inputs, rows then positions, filled by one copy from the host per step.
        self.graph_inputs = torch.zeros(2 * largest, dtype=torch.long, device=self.device)
        self.order = torch.arange(largest + 1, device=self.device)
        self.graph_logits: dict[int, torch.Tensor] = {}
        self.graph_lens: dict[int, torch.Tensor] = {}

    def _graph_batch(self, size: int) -> ForwardBatch:
        rows, positions = self.graph_inputs[:size], self.graph_inputs[size:2 * size]
        ids, slots, lens = decode_inputs(rows, positions, self.last_tokens, self.cache.page_table,
                                         self.cache.page_size)
        return ForwardBatch.decode(ids, rows, positions, self.cache, self.max_seq_len, static_shapes=True,
                                   out_slots=slots, seq_lens=lens, order=self.order[:size + 1])

    @torch.no_grad()
    def capture(self) -> None:
        "Record a graph for every decode size, largest first, so smaller ones reuse its memory."
        largest = max(self.decode_sizes, default=0)
        self.graph_inputs[:largest].fill_(self.cache.scratch_row)
        self.graph_inputs[largest:].zero_()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for size in sorted(self.decode_sizes, reverse=True):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: Triton compiles, cuBLAS picks algorithms, NCCL connects
                    self.model(self._graph_batch(size), self.cache)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                batch = self._graph_batch(size)
                self.graph_logits[size] = self.model(batch, self.cache)
            self.graph_lens[size] = batch.seq_lens
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def decode(self, rows: list[int], positions: list[int], size: int | None = None) -> torch.Tensor:
        size = max(size or 0, len(rows))
        if size not in self.graphs:
            return super().decode(rows, positions, size)
        n, pad = len(rows), size - len(rows)
        self.upload(rows + [self.cache.scratch_row] * pad + positions + [0] * pad,
                    out=self.graph_inputs[:2 * size])
        self.graphs[size].replay()
        self.step_rows, self.step_next_positions = self.graph_inputs[:size], self.graph_lens[size]
        return self.graph_logits[size][:n]
