"""Each Triton kernel against the plain PyTorch path it replaces: fresh random inputs, poisoned outputs.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py), which is exact for float32 and float16 but not bfloat16; on a GPU they also run in
bfloat16 with a bfloat16-sized tolerance."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
# On a GPU machine these run on the GPU, and `pytest -m gpu` selects them; elsewhere in the interpreter.
pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []

from minisgl.kernels.attention import decode_attention  # noqa: E402
from minisgl.kernels.gemv import gemv  # noqa: E402
from minisgl.kernels.moe import (counting_sort_by_expert, fused_silu_and_mul, moe_down, moe_gate_up,  # noqa: E402
                                 moe_grouped_gemm, router_topk, topk_softmax, weighted_sum)
from minisgl.kernels.norm import add_rms_norm  # noqa: E402
from minisgl.kernels.rope import qk_norm_rope_store  # noqa: E402
from minisgl.layers.mlp import silu_and_mul as reference_silu_and_mul
from minisgl.layers.norm import RMSNorm
from minisgl.layers.rotary import RotaryEmbedding
from minisgl.moe.gate import select_experts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    x, res = torch.randn(5, 96, dtype=dtype, device=DEVICE), torch.randn(5, 96, dtype=dtype, device=DEVICE)
    norm = RMSNorm(96, 1e-6, dtype, DEVICE)
    norm.weight.copy_(1 + 0.1 * torch.randn(96))
    out, summed = add_rms_norm(x, res, norm.weight, 1e-6)
    assert torch.equal(summed, x + res)
    assert rel_err(out, norm(x + res)) < TOL[dtype]
    out, summed = add_rms_norm(x, None, norm.weight, 1e-6)
    assert rel_err(out, norm(x)) < TOL[dtype] and summed is x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", [(1, 1), (2, 2), (8, 4)])  # heads per program, warps; 8: q and k heads in one
def test_qk_norm_rope_store(dtype, blocks):
    tokens, heads, kv_heads, d = 3, 4, 2, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, dtype=dtype, device=DEVICE)
    q_norm, k_norm = RMSNorm(d, 1e-6, dtype, DEVICE), RMSNorm(d, 1e-6, dtype, DEVICE)
    q_norm.weight.copy_(1 + 0.1 * torch.randn(d)), k_norm.weight.copy_(1 + 0.1 * torch.randn(d))
    rotary = RotaryEmbedding(d, 10000.0, 64, DEVICE)
    positions = torch.tensor([5, 0, 17], device=DEVICE)
    slots = torch.tensor([37, 2, 19], device=DEVICE)  # anywhere in a paged cache of 48 slots
    k_cache = torch.full((kv_heads, 48, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    q = qk_norm_rope_store(qkv, heads, kv_heads, d, q_norm.weight, k_norm.weight, 1e-6, rotary.cos, rotary.sin,
                           positions, slots, k_cache, v_cache, blocks=blocks)
    q_ref, k_ref, v_ref = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q_ref, k_ref = rotary(positions, q_norm(q_ref.view(tokens, heads, d)), k_norm(k_ref.view(tokens, kv_heads, d)))
    assert rel_err(q, q_ref) < TOL[dtype]
    assert rel_err(k_cache[:, slots].transpose(0, 1), k_ref) < TOL[dtype]
    assert torch.equal(v_cache[:, slots].transpose(0, 1), v_ref.view(tokens, kv_heads, d))
    written = torch.zeros(48, dtype=torch.bool, device=DEVICE)
    written[slots] = True
    assert k_cache[:, ~written].isnan().all(), "the kernel wrote outside its tokens' slots"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (2, 1)])
@pytest.mark.parametrize("num_splits,page_size", [(4, 16), (1, 1), (None, 16), (16, 16)])
def test_decode_attention(dtype, heads, kv_heads, num_splits, page_size):
    """Keys through a page table whose pages are scattered, sequences of 1, 257 and 70 tokens (with 16 splits,
    most of the short sequences' splits have no keys and write nothing)."""
    seqs, d, max_len = 3, 64, 320
    pages_per_row = max_len // page_size
    num_pages = 1 + seqs * pages_per_row
    k_cache = torch.randn(kv_heads, num_pages * page_size, d, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    page_table = torch.zeros(4, pages_per_row, dtype=torch.int32, device=DEVICE)
    page_table[[3, 0, 1]] = (1 + torch.randperm(num_pages - 1, device=DEVICE)).int().view(seqs, pages_per_row)
    q = torch.randn(seqs, heads, d, dtype=dtype, device=DEVICE)
    rows = torch.tensor([3, 0, 1], device=DEVICE)
    lens = torch.tensor([1, 257, 70], device=DEVICE)
    # the merge over the whole head, and in blocks of 16 of its d
    out = decode_attention(q, k_cache, v_cache, page_table, page_size, rows, lens, scale=d ** -0.5,
                           num_splits=num_splits, blocks=(32, 4, 2, 16 if heads == 8 else 64))
    for i in range(seqs):
        n, r = lens[i].item(), rows[i].item()
        positions = torch.arange(n, device=DEVICE)
        slots = page_table[r, positions // page_size].long() * page_size + positions % page_size
        keys, values = k_cache[:, slots][None], v_cache[:, slots][None]
        ref = F.scaled_dot_product_attention(q[i:i + 1, :, None].float(), keys.float(), values.float(),
                                             scale=d ** -0.5, enable_gqa=True)
        assert rel_err(out[i], ref[0, :, 0]) < TOL[dtype], (i, n)


@pytest.mark.parametrize("normalize", [True, False])
def test_topk_softmax(normalize):
    logits = torch.randn(7, 128, device=DEVICE)
    weights, ids = topk_softmax(logits, 8, normalize)
    ref_weights, ref_ids = select_experts(logits, 8, normalize)
    assert torch.equal(ids, ref_ids)
    assert rel_err(weights, ref_weights) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tokens", [1, 5, 40])  # 40: beyond ROUTER_GEMV_MAX_TOKENS, the cuBLAS path
def test_router_topk(dtype, normalize, tokens):
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)  # fixed, so the test always checks some rows
    x = torch.randn(tokens, 256, dtype=dtype, device=DEVICE, generator=gen)
    router_weight = torch.randn(128, 256, dtype=dtype, device=DEVICE, generator=gen) / 16
    weights, ids = router_topk(x, router_weight, 8, normalize, block_k=64)
    ref_logits = F.linear(x.float(), router_weight.float()).to(dtype)
    ref_weights, ref_ids = select_experts(ref_logits, 8, normalize)
    # Summed in another order, a logit can round to the neighbouring 16-bit value, and 16-bit logits
    # tie: compare the chosen set (in expert order) where the 8th and 9th largest logits are clearly apart.
    top9 = ref_logits.float().topk(9, dim=-1).values
    clear = (top9[:, 7] - top9[:, 8]) > {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}[dtype]
    assert clear.any()
    ids, order = ids[clear].sort(dim=-1)
    ref_ids, ref_order = ref_ids[clear].sort(dim=-1)
    assert torch.equal(ids, ref_ids)
    assert weights.dtype == dtype
    assert rel_err(weights[clear].gather(1, order), ref_weights[clear].gather(1, ref_order)) < TOL[dtype]


@pytest.mark.parametrize("pairs,rows_per_x,block_rows", [(200, 2, 16), (7, 1, 64), (0, 8, 64), (2048, 8, 64)])
def test_counting_sort_by_expert_is_a_stable_sort(pairs, rows_per_x, block_rows):
    experts = 12
    ids = torch.randint(0, experts, (pairs,), device=DEVICE)
    ids[: pairs // 4] = 3  # a crowded expert spans several row blocks
    x = torch.randn(pairs // rows_per_x, 72, device=DEVICE)
    rows, counts, row_of_pair = counting_sort_by_expert(x, ids, experts, rows_per_x, block_rows=block_rows)
    order = torch.argsort(ids, stable=True)
    assert torch.equal(rows, x[order // rows_per_x])
    assert torch.equal(counts, torch.bincount(ids, minlength=experts))
    assert torch.equal(order[row_of_pair], torch.arange(pairs, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_matches_grouped_experts(dtype):
    tokens, top_k, experts, hidden, inter = 3, 2, 6, 64, 48
    x = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE)
    w13 = 0.1 * torch.randn(experts, 2 * inter, hidden, dtype=dtype, device=DEVICE)
    w2 = 0.1 * torch.randn(experts, hidden, inter, dtype=dtype, device=DEVICE)
    weights, ids = select_experts(torch.randn(tokens, experts, device=DEVICE), top_k, True)
    ids[1, 1] = -1  # a padding slot contributes nothing
    h = moe_gate_up(x, w13, ids.flatten(), rows_per_x=top_k, blocks=(16, 32, 4))
    out = weighted_sum(moe_down(h, w2, ids.flatten(), blocks=(16, 32, 4)), weights, None)
    ref = torch.zeros(tokens, hidden, dtype=torch.float32, device=DEVICE)
    for t in range(tokens):
        for s in range(top_k):
            e = ids[t, s].item()
            if e < 0:
                assert h[t * top_k + s].eq(0).all()
                continue
            y = reference_silu_and_mul(x[t] @ w13[e].t()) @ w2[e].t()
            ref[t] += weights[t, s].float() * y.float()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_silu_and_mul_and_gathering_weighted_sum(dtype):
    for rows, half in ((5, 40), (70, 40), (3, 1500)):  # part of a row block; two row blocks; two column blocks
        x = torch.randn(rows, 2 * half, dtype=dtype, device=DEVICE)
        assert rel_err(fused_silu_and_mul(x), reference_silu_and_mul(x)) < TOL[dtype]
    tokens, top_k, hidden = 4, 3, 50
    y = torch.randn(tokens * top_k, hidden, dtype=dtype, device=DEVICE)
    w = torch.rand(tokens, top_k, dtype=dtype, device=DEVICE)
    rows = torch.randperm(tokens * top_k, device=DEVICE)  # pair p lives in row rows[p]
    ref = (y[rows].view(tokens, top_k, hidden).float() * w.float()[..., None]).sum(1)
    assert rel_err(weighted_sum(y, w, rows), ref) < TOL[dtype]
    assert rel_err(weighted_sum(y[rows], w, None), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_m", [16, 32])
def test_moe_grouped_gemm(dtype, block_m):
    """Sorted rows, uneven experts (none, one, several tiles), padding rows after the real ones, against
    chapter 05's grouped_gemm (+ silu_and_mul for gate/up)."""
    from minisgl.moe.experts import grouped_gemm
    counts = torch.tensor([5, 0, 70, 1, 33, 2], device=DEVICE)
    experts, hidden, inter, real = 6, 64, 48, int(counts.sum())
    x = torch.randn(real + 9, hidden, dtype=dtype, device=DEVICE)
    w13 = 0.1 * torch.randn(experts, 2 * inter, hidden, dtype=dtype, device=DEVICE)
    w2 = 0.1 * torch.randn(experts, hidden, inter, dtype=dtype, device=DEVICE)
    h = moe_grouped_gemm(x, w13, counts, swiglu=True, blocks=(block_m, 16, 32, 4, 2))
    h_ref = fused_silu_and_mul(grouped_gemm(x[:real].float(), w13.float(), counts)).to(dtype)
    assert h.shape == (real + 9, inter)
    assert rel_err(h[:real], h_ref) < TOL[dtype]
    y = moe_grouped_gemm(h_ref, w2, counts, blocks=(block_m, 32, 16, 4, 2))
    assert rel_err(y, grouped_gemm(h_ref.float(), w2.float(), counts)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv(dtype):
    x, weight = torch.randn(1, 200, dtype=dtype, device=DEVICE), torch.randn(70, 200, dtype=dtype, device=DEVICE)
    ref = F.linear(x.float(), weight.float())
    assert rel_err(gemv(x, weight, (4, 64, 4)), ref) < TOL[dtype]  # a half-empty last block of rows and of k


def test_decode_inputs():
    from minisgl.kernels.decode_inputs import decode_inputs
    from minisgl.kv_cache import page_slots
    page_size = 4
    page_table = torch.randint(1, 50, (6, 8), dtype=torch.int32, device=DEVICE)
    last_tokens = torch.randint(0, 1000, (6,), device=DEVICE)
    rows = torch.tensor([5, 0, 3, 5], device=DEVICE)
    positions = torch.tensor([0, 31, 9, 4], device=DEVICE)
    ids, slots, lens = decode_inputs(rows, positions, last_tokens, page_table, page_size)
    assert torch.equal(ids, last_tokens[rows])
    assert torch.equal(slots, page_slots(page_table, page_size, rows, positions))
    assert torch.equal(lens, positions + 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,block", [(4, 16), (1, 32), (16, 16)])
def test_prefill_attention_over_a_cached_prefix(dtype, page_size, block):
    "A decode, a prompt chunk after a prefix, and a fresh prompt in one batch, against the reference op."
    from types import SimpleNamespace
    from minisgl.kernels.prefill_attention import prefill_attention
    from minisgl.layers.attention import paged_attention
    heads, kv_heads, d, max_len = 4, 2, 32, 48
    seq_lens, query_lens, rows = [30, 21, 9], [1, 13, 9], [2, 0, 1]
    pages_per_row = max_len // page_size
    num_pages = 1 + 3 * pages_per_row
    k_cache = torch.randn(kv_heads, num_pages * page_size, d, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    page_table = torch.zeros(4, pages_per_row, dtype=torch.int32, device=DEVICE)
    page_table[:3] = (1 + torch.randperm(num_pages - 1, device=DEVICE)).int().view(3, pages_per_row)
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, d, dtype=dtype, device=DEVICE)
    starts = torch.tensor([0, 1, 14, 23], device=DEVICE)
    token_seq = torch.repeat_interleave(torch.arange(3, device=DEVICE), torch.tensor(query_lens, device=DEVICE))
    positions = torch.cat([torch.arange(n - q, n, device=DEVICE) for n, q in zip(seq_lens, query_lens)])
    cache = SimpleNamespace(k=k_cache, v=v_cache, page_table=page_table, page_size=page_size,
                            slots=lambda r, p: page_table[r, p // page_size].long() * page_size + p % page_size)
    batch = SimpleNamespace(num_seqs=3, num_tokens=tokens, max_seq_len=max(seq_lens), max_query_len=max(query_lens),
                            seq_rows=torch.tensor(rows, device=DEVICE), seq_lens=torch.tensor(seq_lens, device=DEVICE),
                            query_starts=starts, token_seq=token_seq, positions=positions)
    ref = paged_attention(q.float(), SimpleNamespace(**{**vars(cache), "k": k_cache.float(), "v": v_cache.float()}),
                          batch, d ** -0.5)
    out = prefill_attention(q, k_cache, v_cache, page_table, page_size, batch.seq_rows, batch.seq_lens, starts,
                            d ** -0.5, block_m=block, block_n=block)
    assert rel_err(out, ref) < TOL[dtype]
