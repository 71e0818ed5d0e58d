"""Choosing the next token from logits, per request: greedy, or temperature with top-k and top-p,
with noise seeded by (request seed, position) so a request's tokens never depend on its batch."""

# %% auto #0
__all__ = ['MIN_TEMPERATURE', 'SamplingParams', 'SamplingTensors', 'sample']

import math
from dataclasses import dataclass

import torch

# Below this, dividing logits by the temperature overflows float32's exponent range in softmax's
# inputs for bfloat16 logits of ordinary size; 0 (greedy) is the way to ask for "no randomness".
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    "temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or (t != 0 and t < MIN_TEMPERATURE):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
                             f"got {t!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 switches it off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class SamplingTensors:
    "Each sequence's sampling parameters as device tensors [seqs], for one call over the batch."
    temperature: torch.Tensor  # float32, 0 = greedy
    top_k: torch.Tensor        # int64, 0 = off
    top_p: torch.Tensor        # float32, 1 = off
    seed: torch.Tensor         # int64
    all_greedy: bool           # host flags: which parts of `sample` the batch needs
    any_filter: bool

    @classmethod
    def from_params(cls, params: list[SamplingParams], device=None) -> "SamplingTensors":
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)
        return cls(as_tensor([p.temperature for p in params], torch.float32),
                   as_tensor([p.top_k for p in params], torch.int64),
                   as_tensor([p.top_p for p in params], torch.float32),
                   as_tensor([p.seed for p in params], torch.int64),
                   all(p.greedy for p in params),
                   any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    "An integer hash of 32-bit values held in int64 (no overflow: products stay below 2**59)."
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [seqs, vocab] that is a function of (seed, position, token id) alone: the same on
    every rank, in every layout, whatever else is in the batch."""
    row = _mix32(_mix32(seeds & 0xFFFFFFFF) ^ (seeds >> 32) ^ _mix32(positions & 0xFFFFFFFF))
    tokens = torch.arange(vocab, device=seeds.device)
    bits = _mix32(row[:, None] ^ _mix32(tokens + 0x9E3779B9)[None, :])          # [seqs, vocab]
    uniform = ((bits >> 8).float() + 0.5) * 2.0**-24                              # in (0, 1)
    return -torch.log(uniform)


def sample(logits: torch.Tensor, params: SamplingTensors, positions: torch.Tensor) -> torch.Tensor:
    """logits [seqs, vocab] -> next token ids [seqs]. `positions` [seqs]: where each new token goes,
    which (with the seed) picks its noise. No host sync: it can run inside a CUDA graph."""
    greedy_ids = logits.argmax(dim=-1)
    if params.all_greedy:
        return greedy_ids
    temperature = torch.where(params.temperature > 0, params.temperature, 1.0)
    logits = logits.float() / temperature[:, None]
    if params.any_filter:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)
        keep_k = torch.where(params.top_k > 0, params.top_k, logits.shape[-1])
        drop = rank[None, :] >= keep_k[:, None]                          # top-k, by rank
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # top-p: drop a token once the tokens ranked above it already hold top_p of the mass.
        drop |= probs.cumsum(dim=-1) - probs > params.top_p[:, None]
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, with no multinomial host sync.
    probs = logits.softmax(dim=-1)
    sampled = (probs / _exponential_noise(params.seed, positions, logits.shape[-1])).argmax(dim=-1)
    return torch.where(params.temperature > 0, sampled, greedy_ids)
