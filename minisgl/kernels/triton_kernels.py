"""Triton kernels for the decode step: each replaces a chain of small PyTorch kernels with one launch."""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the engine runs without Triton; the kernels are then unavailable
    triton = None


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, eps, hidden: tl.constexpr,
                             BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * hidden + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            # Round the sum to the activation dtype first, exactly as `x + residual` in PyTorch does.
            x = (x.to(tl.float32) + tl.load(residual_ptr + row * hidden + cols, mask=mask, other=0.0)
                 .to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * hidden + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
        normed = (x32 * rstd).to(x.dtype)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * hidden + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=mask)

    @triton.jit
    def _qk_norm_rope_cache_kernel(qkv_ptr, q_out_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, pos_ptr,
                                   row_ptr, k_cache_ptr, v_cache_ptr, eps, qkv_stride,
                                   cache_row_stride, cache_head_stride, cache_pos_stride,
                                   NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
        token = tl.program_id(0)
        head = tl.program_id(1)  # q heads, then k heads; each k head also moves its v head
        half = tl.arange(0, HEAD_DIM // 2)
        pos = tl.load(pos_ptr + token)
        cos = tl.load(cos_ptr + pos * (HEAD_DIM // 2) + half)
        sin = tl.load(sin_ptr + pos * (HEAD_DIM // 2) + half)
        base = qkv_ptr + token * qkv_stride + head * HEAD_DIM
        x1 = tl.load(base + half)
        x2 = tl.load(base + HEAD_DIM // 2 + half)
        dtype = x1.dtype
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / HEAD_DIM + eps)
        is_q = head < NUM_Q_HEADS
        norm_ptr = tl.where(is_q, q_norm_ptr, k_norm_ptr)
        w1 = tl.load(norm_ptr + half).to(tl.float32)
        w2 = tl.load(norm_ptr + HEAD_DIM // 2 + half).to(tl.float32)
        a = ((a * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        b = ((b * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
        c, s = cos.to(dtype).to(tl.float32), sin.to(dtype).to(tl.float32)
        r1 = ((a * c).to(dtype).to(tl.float32) - (b * s).to(dtype).to(tl.float32)).to(dtype)
        r2 = ((b * c).to(dtype).to(tl.float32) + (a * s).to(dtype).to(tl.float32)).to(dtype)
        if is_q:
            out = q_out_ptr + (token * NUM_Q_HEADS + head) * HEAD_DIM
            tl.store(out + half, r1)
            tl.store(out + HEAD_DIM // 2 + half, r2)
        else:
            kv_head = head - NUM_Q_HEADS
            row = tl.load(row_ptr + token)
            offset = row * cache_row_stride + kv_head * cache_head_stride + pos * cache_pos_stride
            tl.store(k_cache_ptr + offset + half, r1)
            tl.store(k_cache_ptr + offset + HEAD_DIM // 2 + half, r2)
            v_base = qkv_ptr + token * qkv_stride + (NUM_Q_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM
            full = tl.arange(0, HEAD_DIM)
            tl.store(v_cache_ptr + offset + full, tl.load(v_base + full))

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, row_ptr, len_ptr, part_out_ptr, part_lse_ptr,
                                 scale, cache_row_stride, cache_head_stride, cache_pos_stride,
                                 NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
                                 BLOCK_N: tl.constexpr, MAX_BLOCKS: tl.constexpr, PRECISION: tl.constexpr):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(len_ptr + seq)
        row = tl.load(row_ptr + seq)
        # Flash-decoding: each split owns a contiguous chunk of the keys; a second kernel merges them.
        chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        q = tl.load(q_ptr + (seq * NUM_Q_HEADS + heads)[:, None] * HEAD_DIM + d[None, :],
                    mask=(g < GROUP)[:, None], other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        base = row * cache_row_stride + kv_head * cache_head_stride
        # A constant trip count (the cache's capacity) with a guard, rather than a loop bounded by
        # seq_len, keeps the kernel runnable in Triton's CPU interpreter too.
        for i in range(MAX_BLOCKS):
            block_start = start + i * BLOCK_N
            if block_start < end:
                n = block_start + tl.arange(0, BLOCK_N)
                valid = n < end
                offsets = base + n[:, None] * cache_pos_stride + d[None, :]
                k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0)
                v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [GROUP_PAD, BLOCK_N]
                s = tl.where(valid[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                p = tl.exp(s - m_new[:, None])
                alpha = tl.exp(m - m_new)
                l = l * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
                m = m_new
        out_offsets = ((seq * NUM_Q_HEADS + heads) * NUM_SPLITS + split)
        safe_l = tl.where(l > 0, l, 1.0)
        tl.store(part_out_ptr + out_offsets[:, None] * HEAD_DIM + d[None, :], acc / safe_l[:, None],
                 mask=(g < GROUP)[:, None])
        tl.store(part_lse_ptr + out_offsets, tl.where(l > 0, m + tl.log(safe_l), float("-inf")), mask=g < GROUP)

    @triton.jit
    def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, HEAD_DIM: tl.constexpr,
                             NUM_SPLITS: tl.constexpr):
        head = tl.program_id(0)  # flattened (seq, q head)
        splits = tl.arange(0, NUM_SPLITS)
        d = tl.arange(0, HEAD_DIM)
        lse = tl.load(part_lse_ptr + head * NUM_SPLITS + splits)
        weights = tl.exp(lse - tl.max(lse, axis=0))
        weights = weights / tl.sum(weights, axis=0)
        parts = tl.load(part_out_ptr + (head * NUM_SPLITS + splits)[:, None] * HEAD_DIM + d[None, :])
        out = tl.sum(parts * weights[:, None], axis=0)
        tl.store(out_ptr + head * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr,
                             TOP_K: tl.constexpr, NORMALIZE: tl.constexpr):
        token = tl.program_id(0)
        e = tl.arange(0, E_PAD)
        logits = tl.load(logits_ptr + token * NUM_EXPERTS + e, mask=e < NUM_EXPERTS, other=float("-inf"))
        x = logits.to(tl.float32)
        probs = tl.exp(x - tl.max(x, axis=0))
        probs = probs / tl.sum(probs, axis=0)
        total = 0.0
        remaining = probs
        for slot in tl.static_range(TOP_K):
            best = tl.max(remaining, axis=0)
            # The lowest index among equal maxima, as torch.topk picks.
            idx = tl.min(tl.where(remaining == best, e, E_PAD), axis=0)
            tl.store(ids_ptr + token * TOP_K + slot, idx)
            tl.store(weights_ptr + token * TOP_K + slot, best)
            total += best
            remaining = tl.where(e == idx, -1.0, remaining)
        if NORMALIZE:
            k = tl.arange(0, TOP_K)
            w = tl.load(weights_ptr + token * TOP_K + k)
            tl.store(weights_ptr + token * TOP_K + k, w / total)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, half: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < half
        gate = tl.load(x_ptr + row.to(tl.int64) * 2 * half + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row.to(tl.int64) * 2 * half + half + cols, mask=mask, other=0.0)
        dtype = gate.dtype
        g = gate.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)  # rounded where F.silu rounds
        tl.store(out_ptr + row.to(tl.int64) * half + cols, (silu * up.to(tl.float32)).to(dtype), mask=mask)

    @triton.jit
    def _moe_gate_up_kernel(x_ptr, w13_ptr, expert_ptr, h_ptr, rows_per_x, hidden: tl.constexpr,
                            intermediate: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pair = tl.program_id(0)  # one (token, expert) pair: a row of h
        n_block = tl.program_id(1)
        expert = tl.load(expert_ptr + pair)
        n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        # A padding row (expert -1) of a fixed-capacity buffer loads nothing and writes zeros.
        n_mask = (n < intermediate) & (expert >= 0)
        x_row = x_ptr + (pair // rows_per_x) * hidden
        gate_rows = w13_ptr + tl.maximum(expert, 0).to(tl.int64) * (2 * intermediate * hidden) + n[:, None] * hidden
        up_rows = gate_rows + intermediate * hidden
        # Accumulate elementwise and reduce once at the end: a per-iteration reduction across threads
        # would stall the stream of weight loads, which is all this kernel should be doing.
        acc_gate = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < hidden
            x = tl.load(x_row + k, mask=k_mask, other=0.0).to(tl.float32)
            w_mask = n_mask[:, None] & k_mask[None, :]
            acc_gate += tl.load(gate_rows + k[None, :], mask=w_mask, other=0.0).to(tl.float32) * x[None, :]
            acc_up += tl.load(up_rows + k[None, :], mask=w_mask, other=0.0).to(tl.float32) * x[None, :]
        dtype = h_ptr.dtype.element_ty
        gate = tl.sum(acc_gate, axis=1).to(dtype).to(tl.float32)
        up = tl.sum(acc_up, axis=1).to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(h_ptr + pair * intermediate + n, (silu * up).to(dtype), mask=n < intermediate)

    @triton.jit
    def _moe_down_kernel(h_ptr, w2_ptr, expert_ptr, y_ptr, hidden: tl.constexpr, intermediate: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pair = tl.program_id(0)  # y[pair] = h[pair] @ W_down[expert]^T, in the model dtype
        n_block = tl.program_id(1)
        expert = tl.load(expert_ptr + pair)
        n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = (n < hidden) & (expert >= 0)  # a padding row (-1) loads nothing and writes zeros
        rows = w2_ptr + tl.maximum(expert, 0).to(tl.int64) * (hidden * intermediate) + n[:, None] * intermediate
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, intermediate, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < intermediate
            h = tl.load(h_ptr + pair * intermediate + k, mask=k_mask, other=0.0).to(tl.float32)
            acc += tl.load(rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32) \
                * h[None, :]
        tl.store(y_ptr + pair * hidden + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n < hidden)

    @triton.jit
    def _weighted_sum_kernel(y_ptr, weight_ptr, row_ptr, out_ptr, hidden: tl.constexpr, TOP_K: tl.constexpr,
                             BLOCK: tl.constexpr, GATHER: tl.constexpr):
        token = tl.program_id(0)  # out[token] = sum over slots of weight * y[row of (token, slot)], in float32
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hidden
        acc = tl.zeros([BLOCK], tl.float32)
        for slot in tl.static_range(TOP_K):
            pair = token * TOP_K + slot
            row = tl.load(row_ptr + pair).to(tl.int64) if GATHER else pair
            acc += tl.load(y_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32) * \
                tl.load(weight_ptr + pair).to(tl.float32)
        tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x (or of x + residual, also returned): one read of each input, one write of each output.

    Returns (normed, x + residual) with a residual, else normed. x, residual: [rows, hidden] contiguous."""
    hidden = x.shape[-1]
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else out
    if x.shape[0]:
        _add_rms_norm_kernel[(x.shape[0],)](x, residual if residual is not None else x, weight, out, summed, eps,
                                            hidden=hidden, BLOCK=triton.next_power_of_2(hidden),
                                            HAS_RESIDUAL=residual is not None)
    return (out, summed) if residual is not None else out


def qk_norm_rope_cache(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
                       q_norm: torch.Tensor, k_norm: torch.Tensor, eps: float, cos: torch.Tensor,
                       sin: torch.Tensor, positions: torch.Tensor, token_rows: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """From the fused qkv projection [tokens, (q + 2 kv heads) * d]: per-head RMSNorm and RoPE of q and k,
    k and v written into the cache at (row, position). Returns q [tokens, q heads, d]."""
    tokens = qkv.shape[0]
    q = torch.empty(tokens, num_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens:
        _qk_norm_rope_cache_kernel[(tokens, num_q_heads + num_kv_heads)](
            qkv, q, q_norm, k_norm, cos, sin, positions, token_rows, k_cache, v_cache, eps, qkv.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, num_warps=1)
    return q


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_rows: torch.Tensor,
                     kv_lens: torch.Tensor, scale: float, num_splits: int = 16, block_n: int = 64) -> torch.Tensor:
    """One query token per sequence against its cached keys: q [seqs, heads, d] -> [seqs, heads, d].

    Reads each sequence's cache rows in place, only up to its length; the keys are split into
    `num_splits` chunks so that even one sequence keeps many multiprocessors busy."""
    seqs, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    if seqs == 0:
        return out
    part_out = torch.empty(seqs, heads, num_splits, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(seqs, heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(seqs, kv_heads, num_splits)](
        q, k_cache, v_cache, cache_rows, kv_lens, part_out, part_lse, scale,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_Q_HEADS=heads, NUM_KV_HEADS=kv_heads, HEAD_DIM=d, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), NUM_SPLITS=num_splits, BLOCK_N=block_n,
        MAX_BLOCKS=triton.cdiv(triton.cdiv(k_cache.shape[2], num_splits), block_n),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # float32 stays float32 (no TF32)
    _merge_splits_kernel[(seqs * heads,)](part_out, part_lse, out, HEAD_DIM=d, NUM_SPLITS=num_splits)
    return out


def topk_softmax(router_logits: torch.Tensor, top_k: int, normalize: bool):
    "select_experts in one kernel: softmax (float32), top-k, optional renormalisation."
    tokens, num_experts = router_logits.shape
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if tokens:
        _topk_softmax_kernel[(tokens,)](router_logits, weights, ids, NUM_EXPERTS=num_experts,
                                        E_PAD=triton.next_power_of_2(num_experts), TOP_K=top_k,
                                        NORMALIZE=normalize, num_warps=1)
    return weights.to(router_logits.dtype), ids


# (BLOCK_N, BLOCK_K, num_warps): the fastest of 27 configurations each on an H200 at the real shape
# (scripts/probe_fast.py, results/probe/): 22 us for gate_up and 13 us for down at one token.
MOE_BLOCKS = {"gate_up": (8, 128, 8), "down": (8, 512, 4)}


def moe_gate_up(x: torch.Tensor, w13: torch.Tensor, expert_ids: torch.Tensor, rows_per_x: int,
                blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """silu(x W_gate^T) * (x W_up^T) for each (row, expert) pair: x [n, hidden], expert_ids [n * rows_per_x]
    (-1: padding) -> [n * rows_per_x, intermediate]. Row p uses x[p // rows_per_x]. Reads only the chosen
    experts' weights, with no sorting: the fast path for a handful of tokens."""
    block_n, block_k, warps = blocks or MOE_BLOCKS["gate_up"]
    pairs = expert_ids.numel()
    intermediate, hidden = w13.shape[1] // 2, w13.shape[2]
    h = torch.empty(pairs, intermediate, dtype=x.dtype, device=x.device)
    if pairs:
        _moe_gate_up_kernel[(pairs, triton.cdiv(intermediate, block_n))](
            x, w13, expert_ids, h, rows_per_x, hidden=hidden, intermediate=intermediate,
            BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(hidden)), num_warps=warps)
    return h


def moe_down(h: torch.Tensor, w2: torch.Tensor, expert_ids: torch.Tensor, topk_weights: torch.Tensor | None,
             top_k: int, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """h [pairs, intermediate] @ W_down[expert]^T per pair; then, with `topk_weights`, each token's weighted
    sum over its top_k pairs -> [pairs / top_k, hidden]; without, the per-pair rows [pairs, hidden]."""
    block_n, block_k, warps = blocks or MOE_BLOCKS["down"]
    hidden, intermediate = w2.shape[1], w2.shape[2]
    pairs = expert_ids.numel()
    y = torch.empty(pairs, hidden, dtype=h.dtype, device=h.device)
    if pairs:
        _moe_down_kernel[(pairs, triton.cdiv(hidden, block_n))](
            h, w2, expert_ids, y, hidden=hidden, intermediate=intermediate, BLOCK_N=block_n,
            BLOCK_K=min(block_k, triton.next_power_of_2(intermediate)), num_warps=warps)
    return y if topk_weights is None else weighted_sum(y, topk_weights, top_k)


def weighted_sum(y: torch.Tensor, topk_weights: torch.Tensor, top_k: int,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum over slots s of topk_weights[t, s] * y[row of (t, s)], accumulated in float32.

    y holds one row per (token, slot) pair: in pair order, or anywhere if `rows` [tokens * top_k] says
    where (e.g. sorted by expert: the scatter back to token order is then this gather)."""
    tokens, hidden = topk_weights.numel() // top_k, y.shape[1]
    out = torch.empty(tokens, hidden, dtype=y.dtype, device=y.device)
    if tokens:
        block = min(1024, triton.next_power_of_2(hidden))
        _weighted_sum_kernel[(tokens, triton.cdiv(hidden, block))](
            y, topk_weights, rows if rows is not None else y, out, hidden=hidden, TOP_K=top_k, BLOCK=block,
            GATHER=rows is not None)
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    "silu(gate) * up for [rows, 2 * n] -> [rows, n] in one pass (PyTorch takes three)."
    rows, half = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, half, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(1024, triton.next_power_of_2(half))
        _silu_and_mul_kernel[(rows, triton.cdiv(half, block))](gate_up, out, half=half, BLOCK=block)
    return out
