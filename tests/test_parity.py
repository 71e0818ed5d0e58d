"""One forward, every backend: greedy tokens and log-probabilities of the reference (plain PyTorch) and
fast (Triton kernels, CUDA graphs) operations against transformers, on simulated CPU ranks and on GPUs.

On a CPU the fast kernels run in Triton's interpreter (exact in float32), so the fast cases are few
and short. `pytest -m gpu` runs the GPU cases on a machine with CUDA: float32 token for token, bfloat16
with a margin-aware comparison, and decode through captured CUDA graphs against eager steps."""

import pytest
import torch

from minisgl.distributed import run_on_ranks
from minisgl.sampling import SamplingParams
from engines import build_engine

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 1], [2, 7, 1, 8, 2], [4, 4, 4], [250, 17]]
NEW_TOKENS = 5
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def reference_outputs(reference_model):
    "transformers (float32, CPU): greedy tokens, the top-2 logit gap at each step, and log-probs."
    greedy, margins = [], []
    with torch.no_grad():
        for p in PROMPTS:
            out = reference_model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                           eos_token_id=None, pad_token_id=0, output_logits=True,
                                           return_dict_in_generate=True)
            greedy.append(out.sequences[0, len(p):].tolist())
            top2 = torch.stack(out.logits)[:, 0].topk(2, dim=-1).values
            margins.append((top2[:, 0] - top2[:, 1]).tolist())
        logprobs = [reference_model(torch.tensor([p])).logits[0, :-1].log_softmax(-1)
                    .gather(1, torch.tensor(p[1:])[:, None])[:, 0] for p in PROMPTS]
    return greedy, margins, logprobs


def run_backend(checkpoint, tp_size, ep_size, backend, device, dtype, graphs, fast_options):
    engine = build_engine(checkpoint, tp_size, ep_size, backend, device, dtype, graphs=graphs, **fast_options)
    engine.record_margins = True
    results = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
    scores = engine.score(PROMPTS)
    return [r.output_ids for r in results], [r.margins for r in results], scores


def check_float32(per_rank, reference_outputs):
    greedy, _, logprobs = reference_outputs
    for rank, (tokens, _, scores) in enumerate(per_rank):
        assert tokens == greedy, rank
        error = max((ours.float() - ref).abs().max().item() for ours, ref in zip(scores, logprobs) if len(ref))
        assert error < 1e-4, (rank, error)


# The fast cases run in Triton's interpreter (slow): each covers paths the other does not. Alone: the
# gemv experts; TP and EP together: the fixed-size exchange, the counting sort and grouped GEMM behind
# it, and the TP all-reduces. (Kernel by kernel: test_kernels.py; the MoE block's every path with and
# without EP: test_moe.py.)
CPU_CASES = [("reference", 1, 1, {}), ("reference", 2, 2, {}),
             ("fast", 1, 1, {"gemv_max_rows": 64}), ("fast", 2, 2, {"gemv_max_rows": 0})]


@pytest.mark.parametrize("backend,tp,ep,options", CPU_CASES,
                         ids=[f"{b}-tp{t}-ep{e}" + ("-sorted" if o.get("gemv_max_rows") == 0 else "")
                              for b, t, e, o in CPU_CASES])
def test_cpu_float32_matches_transformers(tiny_checkpoint, reference_outputs, backend, tp, ep, options):
    args = (tiny_checkpoint, tp, ep, backend, "cpu", torch.float32, False, options)
    per_rank = run_on_ranks(run_backend, tp * ep, *args, timeout_s=600) if tp * ep > 1 else [run_backend(*args)]
    check_float32(per_rank, reference_outputs)


gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


@pytest.mark.parametrize("backend,graphs", [("reference", False), ("fast", False), ("fast", True)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_float32_matches_transformers(tiny_checkpoint, reference_outputs, backend, graphs):
    check_float32([run_backend(tiny_checkpoint, 1, 1, backend, "cuda", torch.float32, graphs, {})],
                  reference_outputs)


# bfloat16 rounds differently from transformers' float32: tokens may part ways, but only where the
# reference's top two logits were this close (a near-tie), never at a clear choice.
NEAR_TIE = 0.25


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_bfloat16_differs_only_at_near_ties(tiny_checkpoint, reference_outputs, backend):
    greedy, margins, _ = reference_outputs
    tokens, _, _ = run_backend(tiny_checkpoint, 1, 1, backend, "cuda", torch.bfloat16, backend == "fast", {})
    for ours, ref, gaps in zip(tokens, greedy, margins):
        first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if first is not None:
            assert gaps[first] < NEAR_TIE, (ours, ref, gaps)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_graph_replay_equals_eager_steps(tiny_checkpoint):
    "The captured decode graphs compute what the same steps compute eagerly, bit for bit."
    outputs = []
    for graphs in (False, True):
        engine = build_engine(tiny_checkpoint, backend="fast", device="cuda", dtype=torch.bfloat16, graphs=graphs)
        engine.record_margins = True
        results = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
        outputs.append([(r.output_ids, r.margins) for r in results])
        if graphs:
            assert sorted(engine.runner.graphs) == list(engine.runner.decode_sizes)
    assert outputs[0] == outputs[1]
