"""Static batching: a fixed set of prompts, prefilled together, then decoded in lockstep across the
data-parallel attention replicas until the last sequence ends (chapter 07)."""

# %% auto #0
__all__ = ['GenerationResult', 'GenerationStats', 'check_prompts', 'StaticEngine']

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from minisgl.runner import ModelRunner
from minisgl.sampling import SamplingParams, SamplingTensors


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
    # With record_margins: the gap between the two largest logits at each step. Where two layouts
    # (or two kernels) pick different greedy tokens, a tiny gap there says it was a near-tie.
    margins: list[float] | None = None


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


class StaticEngine:
    """Runs a batch of prompts through one model replica per TP group, on a ModelRunner.

    Prompt i goes to replica i % ep_size; its sequence takes row i // ep_size of the replica's
    cache, with pages reserved for its whole length up front. Every rank takes every step, with an
    empty batch if its replica has nothing left, because the MoE all_to_alls need every member of
    the EP group; and every finished sequence stays in the batch until the last one ends."""

    def __init__(self, runner: ModelRunner, max_prefill_tokens: int = 16384):
        self.runner, self.ctx = runner, runner.ctx
        self.config = runner.model.config
        # Prefill goes in chunks of whole prompts of at most this many tokens, so a batch of 256
        # long prompts does not need 256 prompts' worth of activations at once.
        self.max_prefill_tokens = max_prefill_tokens
        self.record_margins = False
        self.stats = GenerationStats()

    @property
    def max_seq_len(self) -> int:
        return self.runner.max_seq_len

    def replica_prompts(self, count: int) -> list[int]:
        "Indices of the prompts this rank's replica serves: prompt i goes to replica i % ep_size."
        return list(range(self.ctx.ep_rank, count, self.ctx.ep_size))

    def reserve_rows(self, seqs: int, max_len: int) -> None:
        "Rows 0..seqs-1, each with pages for `max_len` positions: contiguous, as a dense cache would be."
        cache = self.runner.cache
        pages_per_seq = math.ceil(max_len / cache.page_size)
        if seqs > cache.max_rows or 1 + seqs * pages_per_seq > cache.num_pages:
            raise ValueError(f"{seqs} sequences of {max_len} positions need {seqs} rows and "
                             f"{1 + seqs * pages_per_seq} pages; the cache has {cache.max_rows} rows "
                             f"and {cache.num_pages} pages")
        pages = 1 + torch.arange(seqs * pages_per_seq, dtype=torch.int32, device=cache.page_table.device)
        cache.page_table[:seqs, :pages_per_seq] = pages.view(seqs, pages_per_seq)  # page 0: scratch

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationResult]:
        "Every rank gets every prompt and returns every result, in prompt order."
        check_prompts(prompts, params.max_new_tokens, self.max_seq_len, self.config.vocab_size)
        ctx, device, runner = self.ctx, self.ctx.device, self.runner
        mine = self.replica_prompts(len(prompts))
        my_prompts = [prompts[i] for i in mine]
        lens = [len(p) for p in my_prompts]
        rows = list(range(len(mine)))
        longest = max(map(len, prompts))
        self.reserve_rows(len(mine), longest + params.max_new_tokens)
        sampling = SamplingTensors.from_params([params] * len(mine), device)
        stop_ids = torch.tensor(params.stop_token_ids or (-1,), device=device)
        out = torch.zeros(len(mine), params.max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(len(mine), dtype=torch.bool, device=device)   # [seqs]
        stats = self.stats = GenerationStats(prompt_tokens=sum(map(len, prompts)))
        margins = []

        def take(logits, step):
            if self.record_margins:
                top2 = logits.float().topk(2, dim=-1).values  # [seqs, 2]
                margins.append(top2[:, 0] - top2[:, 1])
            tokens = runner.sample(logits, sampling)
            out[:, step] = tokens
            if params.stop_token_ids:
                done.logical_or_(torch.isin(tokens, stop_ids))

        self._sync()
        start = time.perf_counter()
        # Every replica runs as many prefill chunks as the busiest one: the all_to_alls pair them up.
        most = -(-len(prompts) // ctx.ep_size)   # prompts of the busiest replica
        per_chunk = max(1, self.max_prefill_tokens // longest)
        logits = []
        for first in range(0, max(most, 1), per_chunk):
            chunk = range(first, min(first + per_chunk, len(mine)))
            ids = [t for i in chunk for t in my_prompts[i]]
            logits.append(runner.extend(ids, [lens[i] for i in chunk], [0] * len(chunk), list(chunk)))
        runner.step_rows = torch.tensor(rows, dtype=torch.long, device=device)
        runner.step_next_positions = torch.tensor(lens, dtype=torch.long, device=device)
        take(torch.cat(logits), 0)
        self._sync()
        stats.prefill_seconds = time.perf_counter() - start

        size = runner.padded_size(most)  # the same on every replica: shapes every replica agrees on
        positions, steps, start = lens, 1, time.perf_counter()
        # Without stop tokens every sequence runs to max_new_tokens: no need to ask (a host sync).
        while steps < params.max_new_tokens and not (params.stop_token_ids and self._all_done(done)):
            step_start = time.perf_counter()
            take(runner.decode(rows, positions, size), steps)
            positions = [p + 1 for p in positions]
            steps += 1
            stats.per_step_seconds.append(time.perf_counter() - step_start)
        self._sync()
        stats.decode_seconds = time.perf_counter() - start
        stats.decode_steps = steps - 1

        results = [_result(p, row, params.stop_token_ids) for p, row in zip(my_prompts, out[:, :steps].tolist())]
        if self.record_margins:
            per_seq = torch.stack(margins, dim=1).tolist() if mine else []  # [seqs, steps]
            for result, row in zip(results, per_seq):
                result.margins = row[:len(result.output_ids)]
        results = self._gather(dict(zip(mine, results)), len(prompts))
        stats.output_tokens = sum(len(r.output_ids) for r in results)
        return results

    @torch.no_grad()
    def score(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        "Teacher-forced log-probabilities of tokens 1..n-1 of each prompt given the ones before (float32)."
        check_prompts(prompts, 0, self.max_seq_len, self.config.vocab_size)
        device = self.ctx.device
        mine = self.replica_prompts(len(prompts))
        my_prompts = [prompts[i] for i in mine]
        self.reserve_rows(len(mine), max(len(p) for p in prompts))
        logits = self.runner.extend([t for p in my_prompts for t in p], [len(p) for p in my_prompts],
                                    [0] * len(mine), list(range(len(mine))), logits="all")
        logprobs = logits.float().log_softmax(dim=-1)  # [tokens, vocab]
        results, offset = {}, 0
        for i, p in zip(mine, my_prompts):
            targets = torch.tensor(p[1:], dtype=torch.long, device=device)
            results[i] = logprobs[offset:offset + len(p) - 1].gather(1, targets[:, None])[:, 0].cpu()
            offset += len(p)
        return self._gather(results, len(prompts))

    def _sync(self):
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def _all_done(self, done: torch.Tensor) -> bool:
        "True once every sequence of every replica has stopped (one tiny all-reduce, a host sync)."
        remaining = (~done).sum().reshape(1)
        if self.ctx.world_size > 1:
            dist.all_reduce(remaining)
        return remaining.item() == 0

    def _gather(self, mine: dict, count: int) -> list:
        "Collect every replica's results on every rank (only tp_rank 0 of each replica contributes)."
        if self.ctx.world_size == 1:
            return [mine[i] for i in range(count)]
        parts = [None] * self.ctx.world_size
        dist.all_gather_object(parts, mine if self.ctx.tp_rank == 0 else {})
        merged = {k: v for part in parts for k, v in part.items()}
        return [merged[i] for i in range(count)]


def _result(prompt: list[int], row: list[int], stop_ids: tuple[int, ...]) -> GenerationResult:
    "Cut a replica's row of new tokens after the first stop token."
    for j, t in enumerate(row):
        if t in stop_ids:
            return GenerationResult(list(prompt), row[:j + 1], "stop")
    return GenerationResult(list(prompt), row, "length")
