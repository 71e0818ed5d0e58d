"""The serving runtime (Part III): page pool, prefix cache, scheduler and engine. Under continuous batching,
chunked prefill, preemption and prefix caching a request gets exactly the tokens it gets alone, and
every page comes back."""

import pytest
import torch

from minisgl.distributed import run_on_ranks
from minisgl.runtime.pages import PagePool
from minisgl.runtime.radix import RadixCache
from minisgl.sampling import SamplingParams

# 12 prompts of 1-59 random byte tokens, each with its own number of new tokens (1-19).
_g = torch.Generator().manual_seed(0)
PROMPTS = [torch.randint(0, 256, (int(n),), generator=_g).tolist() for n in torch.randint(1, 60, (12,), generator=_g)]
NEW = [int(n) for n in torch.randint(1, 20, (12,), generator=_g)]
PARAMS = [SamplingParams(max_new_tokens=n) for n in NEW]


def make_llm(checkpoint, **options):
    from minisgl.llm import LLM
    return LLM(str(checkpoint), device="cpu", ignore_eos=True, **options)


def page_accounting(llm) -> bool:
    "Every page is either free or kept by the prefix cache; nothing is left to a finished request."
    scheduler = llm.engine.scheduler
    cached = scheduler.cache.num_pages if scheduler.cache is not None else 0
    return scheduler.pool.num_free + cached == scheduler.pool.num_pages - 1 and not scheduler.running


@pytest.fixture(scope="module")
def alone(tiny_checkpoint, reference_model):
    "Each request run by itself; the first four also checked against transformers' forward, token by token."
    llm = make_llm(tiny_checkpoint)
    outputs = [llm.generate([p], q)[0].output_ids for p, q in zip(PROMPTS, PARAMS)]
    with torch.no_grad():
        for prompt, new, out in list(zip(PROMPTS, NEW, outputs))[:4]:
            ids = list(prompt)
            for _ in range(new):
                ids.append(int(reference_model(torch.tensor([ids])).logits[0, -1].argmax()))
            assert ids[len(prompt):] == out
    return outputs


OPTIONS = {
    "continuous": {},
    "chunked": {"max_prefill_tokens": 7},
    "page-size-1": {"page_size": 1, "max_running_requests": 3},
    "tight-pages": {"max_total_tokens": 120, "page_size": 2, "max_prefill_tokens": 16, "max_running_requests": 5},
    "no-prefix-cache": {"no_prefix_cache": True, "max_total_tokens": 150, "page_size": 4},
    "static": {"static": True},
    "static-chunked": {"static": True, "max_prefill_tokens": 16},
}


@pytest.mark.parametrize("name", OPTIONS)
def test_every_request_gets_the_tokens_it_gets_alone(tiny_checkpoint, alone, name):
    llm = make_llm(tiny_checkpoint, **OPTIONS[name])
    outputs = llm.generate(PROMPTS, PARAMS)
    assert [o.output_ids for o in outputs] == alone
    assert [len(o.output_ids) for o in outputs] == NEW and {o.finish_reason for o in outputs} == {"length"}
    assert page_accounting(llm)
    if name == "tight-pages":
        assert llm.engine.scheduler.stats["preemptions"] > 0  # the budget really was too small
    if name.startswith("static"):
        # The whole batch is admitted at once, its prompts computed in chunks, and it decodes until
        # the longest request ends (finished ones keep their place).
        prefill_steps = -(-sum(map(len, PROMPTS)) // OPTIONS[name].get("max_prefill_tokens", 8192))
        assert llm.engine.stats["steps"] <= prefill_steps + max(NEW) + 2


def _replicas(checkpoint, tp, ep, options):
    llm = make_llm(checkpoint, tp_size=tp, ep_size=ep, **options)
    everything = [o.output_ids for o in llm.generate(PROMPTS, PARAMS)]
    lonely = llm.generate(PROMPTS[:1], PARAMS[:1])[0].output_ids  # every other replica is idle
    return everything, lonely, page_accounting(llm), len(llm.engine.requests)


@pytest.mark.parametrize("tp,ep,options", [(1, 2, {}), (2, 2, {"max_total_tokens": 150, "page_size": 4,
                                                                "max_prefill_tokens": 16})])
def test_data_parallel_replicas(tiny_checkpoint, alone, tp, ep, options):
    for everything, lonely, pages_back, left in run_on_ranks(_replicas, tp * ep, tiny_checkpoint, tp, ep, options,
                                                           timeout_s=300):
        assert everything == alone and lonely == alone[0] and pages_back and left == 0


def test_stop_tokens_strings_and_lengths(tiny_checkpoint, alone):
    llm = make_llm(tiny_checkpoint)
    stop_token = alone[1][3]
    text = llm.tokenizer.decode(alone[2][:6])
    stop_string = text[-2:] if len(text) >= 2 else text
    params = [SamplingParams(max_new_tokens=NEW[0]), SamplingParams(max_new_tokens=NEW[1], stop_token_ids=(stop_token,)),
              SamplingParams(max_new_tokens=NEW[2])]
    outputs = llm.generate(PROMPTS[:3], params, stop=[(), (), (stop_string,)])
    assert outputs[0].output_ids == alone[0] and outputs[0].finish_reason == "length"
    cut = alone[1].index(stop_token) + 1
    assert outputs[1].output_ids == alone[1][:cut] and outputs[1].finish_reason == "stop"
    assert outputs[2].finish_reason == "stop" and stop_string not in outputs[2].text
    assert alone[2][:len(outputs[2].output_ids)] == outputs[2].output_ids
    # One stop string given alone is that string, not its characters.
    [alone_string] = llm.generate(PROMPTS[2:3], params[2], stop=stop_string)
    assert alone_string.output_ids == outputs[2].output_ids
    assert page_accounting(llm)


def test_prefix_cache_hit_gives_the_same_tokens(tiny_checkpoint, alone):
    llm = make_llm(tiny_checkpoint, page_size=4)
    system = PROMPTS[4][:40]
    prompts = [system + [7, 8, 9], system + [1], system + [200, 201, 202, 203, 204]]
    params = SamplingParams(max_new_tokens=6)
    cold = [o.output_ids for o in make_llm(tiny_checkpoint, no_prefix_cache=True).generate(prompts, params)]
    first = llm.generate(prompts[:1], params)[0]
    assert first.cached_tokens == 0
    rest = llm.generate(prompts[1:], params)
    assert [first.output_ids] + [o.output_ids for o in rest] == cold
    assert all(o.cached_tokens == 40 for o in rest)  # 10 full pages of the shared 40 tokens
    llm.engine.reset_prefix_cache()
    scheduler = llm.engine.scheduler
    assert scheduler.pool.num_free == scheduler.pool.num_pages - 1


def test_sampling_is_seeded_per_request(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint)
    params = [SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=i) for i in range(len(PROMPTS))]
    together = [o.output_ids for o in llm.generate(PROMPTS, params)]
    assert together == [llm.generate([p], q)[0].output_ids for p, q in zip(PROMPTS, params)]
    assert together[0] != [o.output_ids for o in llm.generate(PROMPTS[:1], [SamplingParams(
        max_new_tokens=8, temperature=1.0, top_p=0.9, seed=99)])][0]


def test_requests_that_cannot_fit_are_refused(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, max_total_tokens=64, page_size=16)
    with pytest.raises(ValueError, match="needs 5 pages; the KV cache has 4"):
        llm.generate([list(range(60))], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match=r"prompt 1 has token id 999 outside the vocabulary \[0, 320\)"):
        llm.generate([[1], [999]], SamplingParams())
    with pytest.raises(ValueError, match="exceeds the context of 512 tokens"):
        make_llm(tiny_checkpoint).generate([list(range(250)) * 2], SamplingParams(max_new_tokens=20))


def test_page_pool_holders():
    pool = PagePool(6, page_size=4)
    assert pool.num_free == 5 and pool.allocate(6) is None and pool.num_free == 5
    a = pool.allocate(3)
    pool.hold(a[:1])
    pool.release(a)
    assert pool.num_free == 4 and pool.holders[a[0]] == 1
    pool.release(a[:1])
    assert pool.num_free == 5
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(a[:1])


def test_radix_cache_match_insert_and_lru_eviction():
    pool = PagePool(10, page_size=2)
    cache = RadixCache(pool)
    first = pool.allocate(3)
    cache.insert([1, 2, 3, 4, 5, 6, 7], first)          # 3 full pages; the 7th token is not cached
    pool.release(first)                                   # the request finished: only the tree holds them
    assert cache.num_pages == 3 and pool.num_free == 6
    assert cache.match([1, 2, 3, 4, 9, 9]) == first[:2]   # a prefix of whole pages
    assert cache.match([2, 1]) == []
    other = pool.allocate(2)
    cache.insert([1, 2, 8, 8], [first[0], other[1]])      # shares the first page, branches at the second
    pool.release(other)
    assert cache.num_pages == 4
    cache.match([1, 2, 3, 4, 5, 6])                       # the 1-2-3-4-5-6 branch is now the most recent
    pool.hold([first[2]])                                 # a running request uses the deepest page
    assert cache.evict(10) == 1                           # only [8, 8]: [5, 6] is in use, and above it
    assert cache.match([1, 2, 3, 4, 5, 6]) == first and cache.match([1, 2, 8, 8]) == first[:1]
    pool.release([first[2]])                              # the request finished
    assert cache.evict(10) == 3 and cache.num_pages == 0 and pool.num_free == 9


def test_radix_cache_keeps_its_leaves_under_random_inserts_and_evictions():
    """`leaves` (what eviction picks from, kept up to date so that it never walks the tree) is exactly the set
    of nodes without children, whatever inserts and evictions came before; pages held by a request are
    never evicted."""
    import random

    rng = random.Random(0)
    pool = PagePool(200, 2)
    cache = RadixCache(pool)
    held = []
    for _ in range(400):
        if rng.random() < 0.6:
            tokens = [rng.randrange(3) for _ in range(rng.randint(2, 12))]
            pages = pool.allocate(len(tokens) // 2)
            if pages is None:
                continue
            cache.insert(tokens, pages)
            if rng.random() < 0.3:
                held.append(pages)  # a request still running on them
            else:
                pool.release(pages)
        else:
            cache.evict(rng.randint(1, 6))
        nodes, stack = [], list(cache.root.children.values())
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        assert cache.leaves == {n for n in nodes if not n.children}
        assert cache.num_pages == len(nodes)
        assert all(pool.holders[p] >= 1 for pages in held for p in pages)


def test_requests_are_compared_by_identity():
    "Two requests with the same fields are two requests (and looking one up never compares prompts)."
    from minisgl.runtime.request import Request
    a, b = Request(0, [1, 2, 3], SamplingParams()), Request(0, [1, 2, 3], SamplingParams())
    assert a != b and a == a and [a].count(b) == 0 and len({a, b}) == 2


def test_preempted_requests_recompute_in_chunks(tiny_checkpoint, alone):
    "Tight pages and tiny chunks: recomputation after preemption itself runs in several chunks."
    llm = make_llm(tiny_checkpoint, max_total_tokens=100, page_size=2, max_prefill_tokens=3, max_running_requests=6)
    assert [o.output_ids for o in llm.generate(PROMPTS, PARAMS)] == alone
    assert llm.engine.scheduler.stats["preemptions"] > 0 and page_accounting(llm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_runtime(tiny_checkpoint, alone, dtype):
    """On a GPU (fast operations, CUDA graphs for decode steps, the paged prefill kernel for chunks and
    prefix hits): float32 gives the CPU's tokens under tight pages and small chunks; bfloat16 runs the
    same workload to the end with every page back."""
    from minisgl.llm import LLM
    llm = LLM(str(tiny_checkpoint), device="cuda", dtype=dtype, ignore_eos=True, max_total_tokens=150, page_size=4,
              max_prefill_tokens=16, max_running_requests=8)
    outputs = llm.generate(PROMPTS, PARAMS)
    assert [len(o.output_ids) for o in outputs] == NEW and page_accounting(llm)
    assert llm.engine.stats["graph_steps"] > 0 and llm.engine.scheduler.stats["preemptions"] > 0
    if dtype == "float32":
        assert [o.output_ids for o in outputs] == alone
