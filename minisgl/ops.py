"""The operations the model's layers call, each bound to one implementation when the model is built:
the table of them, and its reference (plain PyTorch) implementation."""

# %% auto #0
__all__ = ['Ops', 'reference_ops']

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Ops:
    """One implementation of every operation a layer calls. Layers never call NCCL, a matmul or
    a kernel directly: they call `ops.<name>`, so the same forward runs plain PyTorch on a laptop
    and fused kernels on a GPU. The chapter that builds each reference is on its right."""
    linear: Callable        # (x [tokens, in], weight [out, in]) -> [tokens, out]           02
    all_reduce: Callable    # (x, group) -> x summed over the group, in place               01
    add_rms_norm: Callable  # (x, residual, weight, eps) -> (normed, x + residual)          03
    qk_norm_rope_store: Callable  # q/k norms and RoPE; k and v into the cache -> q         03
    attention: Callable     # (q, layer cache, batch, scale) -> [tokens, heads, head_dim]   03
    route: Callable         # (x, router weight, top_k, normalize) -> (weights, ids)       04
    experts: Callable       # (ExpertRows, LocalExperts) -> (outputs, row of each pair)     05
    weighted_sum: Callable  # (outputs, weights, row of each pair) -> [tokens, hidden]      05
    exchange: Callable      # (num_experts, ep_rank, ep_size, ep_group) -> an exchange      05
    name: str = "reference"


def reference_ops() -> Ops:
    "Plain PyTorch, as chapters 01-05 build it: the definition every faster implementation matches."
    # Imported here, not at the top: the layers these come from are built on this module.
    import torch.nn.functional as F

    from minisgl.distributed import all_reduce
    from minisgl.layers.attention import paged_attention, qk_norm_rope_store
    from minisgl.layers.norm import add_rms_norm
    from minisgl.moe.dispatch import make_exchange, weighted_sum
    from minisgl.moe.experts import run_experts
    from minisgl.moe.gate import route
    return Ops(linear=F.linear, all_reduce=all_reduce, add_rms_norm=add_rms_norm,
               qk_norm_rope_store=qk_norm_rope_store, attention=paged_attention, route=route,
               experts=run_experts, weighted_sum=weighted_sum, exchange=make_exchange)
