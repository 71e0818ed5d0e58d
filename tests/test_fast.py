"""Chapter 09's FastForward against the model's own forward: same greedy tokens and the same top-2 logit
gaps, in float32 on simulated ranks, for the gemv and the sorted grouped-GEMM MoE paths, with and
without expert parallelism (the fixed-capacity all_to_all with padding rows), with TP all-reduces."""

import pytest
import torch

pytest.importorskip("triton")
# The ranks run on the CPU, with the kernels in Triton's interpreter; on a GPU machine the capstone
# compares the fast and plain paths instead (scripts/gpu_results.sh capstone).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks; see scripts/gpu_results.sh")

from minisgl.config import preset  # noqa: E402
from minisgl.distributed import ParallelContext, run_on_ranks  # noqa: E402
from minisgl.fast import FastForward  # noqa: E402
from minisgl.generation import Generator  # noqa: E402
from minisgl.loader import DummySource  # noqa: E402
from minisgl.model import Qwen3MoeForCausalLM  # noqa: E402
from minisgl.sampling import SamplingParams  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 1], [2, 7, 1, 8, 2], [4, 4, 4]]


def fast_and_plain(tp_size, ep_size, gemv_max_rows):
    import torch.distributed as dist
    ctx = ParallelContext.from_process_group(tp_size, ep_size) if dist.is_initialized() else ParallelContext.single()
    config = preset("tiny")
    model = Qwen3MoeForCausalLM(config, ctx, dtype=torch.float32)
    model.load(DummySource(config, seed=5, std=0.1))
    params = SamplingParams(max_new_tokens=4)
    fast = FastForward(model, graph_batch_sizes=(1, 2, 4), gemv_max_rows=gemv_max_rows)
    results = []
    for generator in (Generator(model, 32), Generator(model, 32, fast=fast)):
        generator.record_margins = True
        out = generator.generate(PROMPTS, params)
        results.append(([r.output_ids for r in out], [r.margins for r in out]))
    return results


@pytest.mark.parametrize("tp_size,ep_size,gemv_max_rows", [
    (1, 1, 64), (1, 1, 0),   # one rank: gemv MoE, sorted MoE
    (2, 1, 64),              # TP all-reduces
    (1, 2, 64), (1, 2, 0),   # EP: fixed capacity with gemv; with the sort that drops padding rows
    (2, 2, 0),
])
def test_fast_forward_matches_plain(tp_size, ep_size, gemv_max_rows):
    world = tp_size * ep_size
    per_rank = (run_on_ranks(fast_and_plain, world, tp_size, ep_size, gemv_max_rows, timeout_s=300) if world > 1
                else [fast_and_plain(tp_size, ep_size, gemv_max_rows)])
    for (plain_ids, plain_margins), (fast_ids, fast_margins) in per_rank:
        assert fast_ids == plain_ids
        gap = max(abs(a - b) for pm, fm in zip(plain_margins, fast_margins) for a, b in zip(pm, fm))
        assert gap < 1e-4, gap
