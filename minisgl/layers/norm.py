"""RMSNorm, computed in float32 as transformers does, so bfloat16 runs round the same way."""

import torch
from torch import nn

from ..weights import WeightSource


class RMSNorm(nn.Module):
    "x / rms(x) * weight over the last dimension; replicated on every rank (it is tiny)."

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def load(self, source: WeightSource, name: str) -> None:
        self.weight.copy_(source.read(name, tuple(self.weight.shape)))
