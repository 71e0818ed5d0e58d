"""RMSNorm, computed in float32 as transformers does, so bfloat16 runs round the same way; and the
residual add before it, as one operation a kernel can fuse."""

# %% auto #0
__all__ = ['rms_norm', 'add_rms_norm', 'RMSNorm']

import torch
from torch import nn

from minisgl.weights import WeightSource


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    "x / rms(x) * weight over the last dimension: float32 inside, cast back, then the weight."
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm step of a decoder layer: (rms_norm(x + residual), x + residual).

    With no residual yet (the first layer), x itself is the residual stream."""
    if residual is not None:
        x = x + residual
    return rms_norm(x, weight, eps), x


class RMSNorm(nn.Module):
    "The weight of an RMSNorm and its epsilon; replicated on every rank (it is tiny)."

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def load(self, source: WeightSource, name: str) -> None:
        self.weight.copy_(source.read(name, tuple(self.weight.shape)))
