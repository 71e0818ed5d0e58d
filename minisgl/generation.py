"""Prefill, then decode with the KV cache, across data-parallel attention replicas kept in lockstep."""

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .layers.attention import AttentionBatch
from .model import Qwen3MoeForCausalLM
from .sampling import SamplingParams, sample


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)


@dataclass
class GenerationStats:
    "Wall-clock times on this rank; every rank runs the same steps in lockstep."
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    per_step_seconds: list[float] = field(default_factory=list)


def check_prompts(prompts: list[list[int]], new_tokens: int, max_seq_len: int, vocab_size: int) -> None:
    "Each prompt non-empty, in the vocabulary, and short enough to leave room for `new_tokens`."
    if not prompts:
        raise ValueError("no prompts to generate from")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if len(prompt) + new_tokens > max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={new_tokens} it needs "
                             f"{len(prompt) + new_tokens} positions, but the context is {max_seq_len}")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")


class Generator:
    """Runs a batch of prompts through one model replica per TP group.

    Prompt i goes to replica i % ep_size. Every rank takes every step, with an empty batch if its
    replica has nothing left, because the MoE all_to_alls need every member of the EP group."""

    def __init__(self, model: Qwen3MoeForCausalLM, max_seq_len: int | None = None):
        self.model, self.ctx = model, model.ctx
        self.max_seq_len = max_seq_len or model.max_positions
        self.stats = GenerationStats()

    def _sync(self):
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def _all_done(self, done: torch.Tensor) -> bool:
        "True once every sequence of every replica has stopped (one tiny all-reduce, a host sync)."
        remaining = (~done).sum().reshape(1)
        if self.ctx.world_size > 1:
            dist.all_reduce(remaining)
        return remaining.item() == 0

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationResult]:
        "Every rank gets every prompt and returns every result, in prompt order."
        check_prompts(prompts, params.max_new_tokens, self.max_seq_len, self.model.config.vocab_size)
        device, ctx = self.ctx.device, self.ctx
        mine = list(range(ctx.ep_rank, len(prompts), ctx.ep_size))
        my_prompts = [prompts[i] for i in mine]
        seqs = len(my_prompts)
        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        kv_cache = self.model.make_kv_cache(max(seqs, 1), max_len)
        generator = torch.Generator(device=device).manual_seed(params.seed * 1_000_003 + ctx.ep_rank)
        stop_ids = torch.tensor(params.stop_token_ids or (-1,), device=device)
        out = torch.zeros(seqs, params.max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(seqs, dtype=torch.bool, device=device)
        stats = self.stats = GenerationStats(prompt_tokens=sum(map(len, prompts)))

        self._sync()
        start = time.perf_counter()
        lens = [len(p) for p in my_prompts]
        batch = AttentionBatch.build(lens, [0] * seqs, device=device)
        input_ids = torch.tensor([t for p in my_prompts for t in p], dtype=torch.long, device=device)
        last_token = torch.tensor(lens, dtype=torch.long, device=device).cumsum(0) - 1
        tokens = sample(self.model(input_ids, batch, kv_cache, logits_index=last_token), params, generator)
        steps = 1
        out[:, 0] = tokens
        done |= torch.isin(tokens, stop_ids)
        self._sync()
        stats.prefill_seconds = time.perf_counter() - start

        start = time.perf_counter()
        while steps < params.max_new_tokens and not self._all_done(done):
            step_start = time.perf_counter()
            batch = AttentionBatch.build([1] * seqs, [n + steps - 1 for n in lens], device=device)
            tokens = sample(self.model(tokens, batch, kv_cache), params, generator)
            out[:, steps] = tokens
            done |= torch.isin(tokens, stop_ids)
            steps += 1
            stats.per_step_seconds.append(time.perf_counter() - step_start)
        self._sync()
        stats.decode_seconds = time.perf_counter() - start
        stats.decode_steps = steps - 1

        mine_results = [_result(p, row, params.stop_token_ids) for p, row in zip(my_prompts, out[:, :steps].tolist())]
        results = self._gather(dict(zip(mine, mine_results)), len(prompts))
        stats.output_tokens = sum(len(r.output_ids) for r in results)
        return results

    def _gather(self, mine: dict, count: int) -> list[GenerationResult]:
        "Collect every replica's results on every rank (only tp_rank 0 of each replica contributes)."
        if self.ctx.world_size == 1:
            return [mine[i] for i in range(count)]
        parts = [None] * self.ctx.world_size
        dist.all_gather_object(parts, mine if self.ctx.tp_rank == 0 else {})
        merged = {k: v for part in parts for k, v in part.items()}
        return [merged[i] for i in range(count)]

    @torch.no_grad()
    def score(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        "Teacher-forced log-probabilities of tokens 1..n-1 of each prompt given the ones before (float32)."
        check_prompts(prompts, 0, self.max_seq_len, self.model.config.vocab_size)
        device, ctx = self.ctx.device, self.ctx
        mine = list(range(ctx.ep_rank, len(prompts), ctx.ep_size))
        my_prompts = [prompts[i] for i in mine]
        kv_cache = self.model.make_kv_cache(max(len(mine), 1), max(len(p) for p in prompts))
        batch = AttentionBatch.build([len(p) for p in my_prompts], [0] * len(mine), device=device)
        input_ids = torch.tensor([t for p in my_prompts for t in p], dtype=torch.long, device=device)
        logprobs = self.model(input_ids, batch, kv_cache).float().log_softmax(dim=-1)  # [tokens, vocab]
        results, offset = {}, 0
        for i, p in zip(mine, my_prompts):
            targets = torch.tensor(p[1:], dtype=torch.long, device=device)
            results[i] = logprobs[offset:offset + len(p) - 1].gather(1, targets[:, None])[:, 0].cpu()
            offset += len(p)
        return self._gather(results, len(prompts))


def _result(prompt: list[int], row: list[int], stop_ids: tuple[int, ...]) -> GenerationResult:
    for j, t in enumerate(row):
        if t in stop_ids:
            return GenerationResult(list(prompt), row[:j + 1], "stop")
    return GenerationResult(list(prompt), row, "length")
