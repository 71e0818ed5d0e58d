"""Moving (token, expert) rows to the ranks that own the experts and back: no move at all without
expert parallelism, two all_to_alls inside the EP group with it; then the top-k weighted sum."""

# %% auto #0
__all__ = ['sort_by_expert', 'exchange_counts', 'LocalExchange', 'AllToAllExchange', 'make_exchange',
           'weighted_sum']

import torch

from minisgl.distributed import all_to_all
from minisgl.moe.experts import ExpertRows, expert_slice


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    "(order of the flattened (token, slot) pairs sorted by expert id, pairs per expert [num_experts])."
    flat_ids = topk_ids.flatten()                        # [tokens * top_k], pair p = (token p // top_k, slot p % top_k)
    pair_order = torch.argsort(flat_ids, stable=True)    # stable: ties keep token order, so runs are reproducible
    return pair_order, torch.bincount(flat_ids, minlength=num_experts)


def exchange_counts(send_counts: torch.Tensor, ep_group) -> torch.Tensor:
    """send_counts [ep_size, num_local_experts]: row r = pairs for rank r's experts.
    Returns recv_counts of the same shape: row r = pairs rank r sends for my experts."""
    return all_to_all(send_counts.flatten(), ep_group).view_as(send_counts)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    "The permutation that undoes `order`: inverse[order[i]] = i."
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class LocalExchange:
    "Without expert parallelism every expert is on this rank: the rows are the tokens themselves."

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, batch=None):
        "x [tokens, hidden], topk_ids [tokens, top_k] -> (this rank's expert rows, combine's state)."
        top_k = topk_ids.shape[1]
        return ExpertRows(x, topk_ids.flatten(), top_k, topk_ids.numel()), None

    def combine(self, y: torch.Tensor, row_of_pair: torch.Tensor | None, state):
        "Nothing to move back: (outputs, the row of each (token, slot) pair in them)."
        return y, row_of_pair


class AllToAllExchange:
    """Routes rows between the ranks of one EP group (the ranks that share a tp_rank), with exact
    message sizes.

    dispatch: sort the (token, slot) pairs by expert, which groups them by owner too; exchange the
    per-expert counts; exchange the rows with uneven splits (the sizes reach the host: a sync).
    combine: the rows come back the same way, and land in the order the pairs were sorted in."""

    def __init__(self, num_experts: int, ep_rank: int = 0, ep_size: int = 1, ep_group=None):
        self.num_experts, self.ep_size, self.ep_group = num_experts, ep_size, ep_group
        self.num_local_experts = len(expert_slice(num_experts, ep_rank, ep_size))

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, batch=None):
        "x [tokens, hidden], topk_ids [tokens, top_k] -> (rows for my experts, combine's state)."
        top_k, local = topk_ids.shape[1], self.num_local_experts
        pair_order, send_counts = sort_by_expert(topk_ids, self.num_experts)       # 1. sort
        send = x[pair_order // top_k]                   # [tokens * top_k, hidden], grouped by owner
        send_counts = send_counts.view(self.ep_size, local)
        recv_counts = exchange_counts(send_counts, self.ep_group)                   # 2. counts
        send_splits = send_counts.sum(1).tolist()                                   # host sync
        recv_splits = recv_counts.sum(1).tolist()
        received = all_to_all(send, self.ep_group, recv_splits, send_splits)        # 3. rows
        # Rows arrive by source rank, and within each source by expert: label each with its expert.
        local_ids = torch.arange(local, device=x.device).repeat(self.ep_size)
        row_experts = local_ids.repeat_interleave(recv_counts.flatten(), output_size=sum(recv_splits))
        rows = ExpertRows(received, row_experts, 1, received.shape[0])
        return rows, (pair_order, send_splits, recv_splits)

    def combine(self, y: torch.Tensor, row_of_pair: torch.Tensor | None, state):
        "y: outputs of the received rows -> (outputs of my pairs, the row of each pair in them)."
        pair_order, send_splits, recv_splits = state
        if row_of_pair is not None:
            y = y[row_of_pair]                          # back to the order the rows arrived in
        back = all_to_all(y, self.ep_group, send_splits, recv_splits)               # 4. back
        return back, _inverse(pair_order)               # pair p's output is row inverse[p]


def make_exchange(num_experts: int, ep_rank: int = 0, ep_size: int = 1, ep_group=None):
    "The reference exchange for a layout: none without EP, exact all_to_alls with it."
    if ep_size == 1:
        return LocalExchange()
    return AllToAllExchange(num_experts, ep_rank, ep_size, ep_group)


def weighted_sum(y: torch.Tensor, topk_weights: torch.Tensor,
                 row_of_pair: torch.Tensor | None) -> torch.Tensor:
    """out[t] = sum over slots s of topk_weights[t, s] * y[row of pair (t, s)], in float32.

    `row_of_pair` [tokens * top_k] says where each pair's output sits in y (None: in pair order)."""
    tokens, top_k = topk_weights.shape
    per_pair = y if row_of_pair is None else y[row_of_pair]        # [tokens * top_k, hidden]
    weighted = per_pair.view(tokens, top_k, y.shape[1]).float() * topk_weights.float()[..., None]
    return weighted.sum(dim=1).to(y.dtype)                          # [tokens, hidden]
