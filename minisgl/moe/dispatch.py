"""Expert parallelism's two all_to_alls: send each (token, slot) to its expert's owner, and back."""

from dataclasses import dataclass

import torch

from ..distributed import all_to_all
from .experts import expert_slice


@dataclass
class DispatchState:
    "What combine needs to bring every expert output back to the (token, slot) it came from."
    pair_order: torch.Tensor          # [tokens * top_k] (token, slot) pairs, sorted by expert id
    recv_order: torch.Tensor | None   # [received] received rows, sorted by local expert (None: already sorted)
    send_splits: list[int] | None     # rows sent to each EP rank (None: no EP group)
    recv_splits: list[int] | None     # rows received from each EP rank
    top_k: int


class AllToAllDispatcher:
    """Routes rows between the ranks of one EP group (the ranks that share a tp_rank).

    dispatch: sort the (token, slot) pairs by expert, which groups them by owner too; exchange
    per-expert counts; exchange the rows themselves with uneven splits; regroup what arrived by
    local expert. combine: the same moves backwards, then the top-k weighted sum."""

    def __init__(self, num_experts: int, ep_rank: int = 0, ep_size: int = 1, ep_group=None):
        self.num_experts, self.ep_size, self.ep_group = num_experts, ep_size, ep_group
        self.num_local_experts = len(expert_slice(num_experts, ep_rank, ep_size))

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor):
        "x: [tokens, hidden], topk_ids: [tokens, top_k] -> (rows for my experts, rows per local expert, state)."
        top_k = topk_ids.shape[1]
        flat_ids = topk_ids.flatten()                             # [tokens * top_k]
        pair_order = torch.argsort(flat_ids, stable=True)
        send = x[pair_order // top_k]                             # [tokens * top_k, hidden], grouped by owner
        send_counts = torch.bincount(flat_ids, minlength=self.num_experts)
        if self.ep_group is None:
            return send, send_counts, DispatchState(pair_order, None, None, None, top_k)
        # Row e of the counts each rank sends is "how many rows for your local expert e".
        send_counts = send_counts.view(self.ep_size, self.num_local_experts)
        recv_counts = all_to_all(send_counts.flatten(), self.ep_group).view(self.ep_size, self.num_local_experts)
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()  # host sync
        received = all_to_all(send, self.ep_group, recv_splits, send_splits)  # [received, hidden], by source rank
        local_ids = torch.arange(self.num_local_experts, device=x.device).repeat(self.ep_size)
        recv_order = torch.argsort(local_ids.repeat_interleave(recv_counts.flatten()), stable=True)
        state = DispatchState(pair_order, recv_order, send_splits, recv_splits, top_k)
        return received[recv_order], recv_counts.sum(0), state

    def combine(self, expert_out: torch.Tensor, state: DispatchState, topk_weights: torch.Tensor) -> torch.Tensor:
        "expert_out: [received, hidden] in dispatch's order -> [tokens, hidden], the weighted sum over slots."
        if state.recv_order is not None:
            by_source = torch.empty_like(expert_out)
            by_source[state.recv_order] = expert_out
            expert_out = all_to_all(by_source, self.ep_group, state.send_splits, state.recv_splits)
        per_pair = torch.empty_like(expert_out)
        per_pair[state.pair_order] = expert_out                   # [tokens * top_k, hidden], (token, slot) order
        tokens, hidden = topk_weights.shape[0], expert_out.shape[1]
        weighted = per_pair.view(tokens, state.top_k, hidden).float() * topk_weights.float()[..., None]
        return weighted.sum(dim=1).to(expert_out.dtype)           # [tokens, hidden]
