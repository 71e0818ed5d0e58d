"""Shared by the tests: a model and a static engine for one rank, from a checkpoint or a weight source."""

import torch


def context(tp_size: int, ep_size: int, device: str = "cpu"):
    "This rank's ParallelContext: from the process group on simulated ranks, else a single process."
    import torch.distributed as dist
    from minisgl.distributed import ParallelContext
    if dist.is_initialized():
        return ParallelContext.from_process_group(tp_size, ep_size, device)
    return ParallelContext.single(device)


def build_engine(source_or_checkpoint, tp_size: int = 1, ep_size: int = 1, backend: str = "reference",
                 device: str = "cpu", dtype=torch.float32, max_seqs: int = 8, max_seq_len: int = 64,
                 config=None, graphs: bool = False, **fast_options):
    """A StaticEngine on this rank of a tp x ep layout. `backend`: "reference" or "fast"; `source_or_checkpoint`:
    a checkpoint directory or a WeightSource (then `config` says the shape)."""
    from pathlib import Path
    from minisgl.config import ModelConfig
    from minisgl.generation import StaticEngine
    from minisgl.launch import make_runner
    from minisgl.loader import SafetensorsSource
    from minisgl.model import Qwen3MoeForCausalLM
    ctx = context(tp_size, ep_size, device)
    if isinstance(source_or_checkpoint, (str, Path)):
        config = ModelConfig.from_pretrained(source_or_checkpoint)
        source = SafetensorsSource(source_or_checkpoint)
    else:
        source = source_or_checkpoint
    ops = None
    if backend == "fast":
        from minisgl.fast_ops import fast_ops
        ops = fast_ops(ctx, config.hidden_size, dtype, **fast_options)
    model = Qwen3MoeForCausalLM(config, ctx, dtype=dtype, ops=ops)
    model.load(source)
    return StaticEngine(make_runner(model, max_seqs, max_seq_len, graphs=graphs))
