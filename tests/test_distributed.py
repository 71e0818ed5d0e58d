"""Chapter 01: the rank grid, simulated ranks (results, failures, hangs, cleanup), the group collectives, their
timeouts, and the count of collectives per forward."""
import multiprocessing as mp
import os
import re
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

from minisgl.config import QWEN3_30B_A3B_CONFIG, ModelConfig, preset
from minisgl.distributed import (CollectiveTimeout, ParallelContext, ParallelLayout, RankError, all_gather, all_reduce,
                                 all_to_all, broadcast, collectives_per_forward, init_distributed, reduce_scatter,
                                 run_on_ranks)

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4), (2, 4), (4, 2), (8, 1), (1, 8), (3, 2)]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("tp, ep", LAYOUTS)
def test_grid_coordinates_and_groups(tp, ep):
    layout = ParallelLayout(tp, ep)
    assert layout.world_size == tp * ep
    assert layout.grid().tolist() == [[e * tp + t for t in range(tp)] for e in range(ep)]
    tp_groups, ep_groups = layout.tp_group_ranks(), layout.ep_group_ranks()
    assert tp_groups == [list(range(e * tp, (e + 1) * tp)) for e in range(ep)]  # consecutive ranks
    assert ep_groups == [list(range(t, tp * ep, tp)) for t in range(tp)]         # stride tp
    for rank in range(layout.world_size):
        tp_rank, ep_rank = layout.coords(rank)
        assert (tp_rank, ep_rank) == (rank % tp, rank // tp)
        assert [g for g in tp_groups if rank in g] == [tp_groups[ep_rank]]  # exactly one TP group
        assert [g for g in ep_groups if rank in g] == [ep_groups[tp_rank]]  # exactly one EP group
        assert tp_groups[ep_rank].index(rank) == tp_rank and ep_groups[tp_rank].index(rank) == ep_rank


def test_layout_rejects_bad_sizes():
    with pytest.raises(ValueError, match="tp_size=0"):
        ParallelLayout(0, 2)
    with pytest.raises(ValueError, match=r"world size 6 != tp_size 2 x ep_size 4 = 8"):
        ParallelLayout(2, 4).check_world_size(6)


def finish_in_reverse(world_size):
    rank = dist.get_rank()
    time.sleep(0.04 * (world_size - rank))  # the highest rank finishes first
    return rank, dist.get_world_size(), torch.get_num_threads(), torch.ones(2, 2) @ torch.ones(2, 2)


def test_results_in_rank_order():
    results = run_on_ranks(finish_in_reverse, 4, 4, timeout_s=30)
    assert [r[:3] for r in results] == [(rank, 4, 1) for rank in range(4)]
    assert all(torch.equal(r[3], torch.full((2, 2), 2.0)) for r in results)


def trivial():
    return dist.get_rank()


def test_trivial_ranks_do_not_break_each_other():
    # A rank that finishes at once must not exit while its peers still connect to it.
    for world_size in (2, 4, 8, 4, 2, 8):
        assert run_on_ranks(trivial, world_size, timeout_s=30) == list(range(world_size))


def write_pid(pid_dir):
    """This rank's pid in a file named after its rank, whole or not at all: once a rank fails, the others
    may be killed at any moment, also between creating the file and writing it."""
    path = os.path.join(pid_dir, str(dist.get_rank()))
    with open(path + ".partial", "w") as file:
        file.write(str(os.getpid()))
    os.replace(path + ".partial", path)


def read_pids(pid_dir) -> list[int]:
    return [int(open(os.path.join(pid_dir, name)).read()) for name in os.listdir(pid_dir)
            if not name.endswith(".partial")]


def rank_2_raises(pid_dir):
    write_pid(pid_dir)
    if dist.get_rank() == 2:
        raise ValueError("boom on rank two")
    dist.all_reduce(torch.ones(1))  # the others wait for rank 2, which never comes


def test_failing_rank_raises_its_traceback_quickly():
    with tempfile.TemporaryDirectory() as pid_dir:
        start = time.monotonic()
        with pytest.raises(RankError) as info:
            run_on_ranks(rank_2_raises, 4, pid_dir, timeout_s=60)
        elapsed = time.monotonic() - start
        pids = read_pids(pid_dir)
    message = str(info.value)
    assert message.startswith("rank 2 of 4 failed"), message
    assert "Traceback" in message and "rank_2_raises" in message and "ValueError: boom on rank two" in message
    assert elapsed < 10, elapsed  # not the 60 s timeout
    assert not mp.active_children() and not any(pid_alive(pid) for pid in pids)


def rank_1_exits_hard():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def test_rank_that_dies_without_a_word():
    with pytest.raises(RankError, match="rank 1 of 2 exited with code 3"):
        run_on_ranks(rank_1_exits_hard, 2, timeout_s=60)


def rank_1_never_joins(pid_dir):
    write_pid(pid_dir)
    if dist.get_rank() == 1:
        while True:  # busy, but never calls the collective rank 0 waits in
            time.sleep(0.01)
    return dist.all_reduce(torch.ones(1))


def test_rank_that_never_reaches_the_collective_times_out_and_is_reaped():
    with tempfile.TemporaryDirectory() as pid_dir:
        start = time.monotonic()
        with pytest.raises((TimeoutError, RankError)) as info:
            run_on_ranks(rank_1_never_joins, 2, pid_dir, timeout_s=5)
        elapsed = time.monotonic() - start
        pids = read_pids(pid_dir)
    assert len(pids) == 2
    assert 4 < elapsed < 9, elapsed
    if info.type is TimeoutError:
        assert "ranks [0, 1] of 2 had not finished after 5 s" in str(info.value)
    assert not mp.active_children()
    assert not any(pid_alive(pid) for pid in pids), "a rank outlived run_on_ranks"


def spawned_rank(offset):
    x = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(x)
    return dist.get_rank(), x.item(), torch.get_num_threads()


def test_spawn_start_method():
    # Spawned children import torch and this module afresh: seconds, not milliseconds.
    assert run_on_ranks(spawned_rank, 2, 10, timeout_s=120, start_method="spawn") == [(0, 21.0, 1), (1, 21.0, 1)]


def group_collectives(layouts):
    out = {}
    for tp, ep in layouts:  # every rank builds every layout's groups in the same order
        ctx = ParallelContext.from_process_group(tp, ep)
        one_hot = torch.zeros(ctx.world_size)
        one_hot[ctx.rank] = 1
        rows = ctx.ep_size * (ctx.ep_rank + 1)  # uneven: ep_rank e sends e + 1 rows to every peer
        sent = torch.arange(rows, dtype=torch.float32)[:, None] + 100 * ctx.rank
        out[tp, ep] = {
            "coords": (ctx.tp_rank, ctx.ep_rank),
            "tp_sum": all_reduce(one_hot.clone(), ctx.tp_group),
            "ep_sum": all_reduce(one_hot.clone(), ctx.ep_group),
            "tp_gather": all_gather(torch.tensor([[ctx.rank]]), ctx.tp_group, dim=-1),
            "ep_gather": all_gather(torch.tensor([[ctx.rank]]), ctx.ep_group, dim=0),
            "tp_scatter": reduce_scatter(torch.arange(2.0 * ctx.tp_size).view(ctx.tp_size, 2) * (ctx.rank + 1),
                                         ctx.tp_group),
            "ep_broadcast": broadcast(torch.tensor([float(ctx.rank)]), ctx.ep_group, src=ctx.ep_size - 1),
            "ep_all_to_all": all_to_all(sent, ctx.ep_group, [(p + 1) for p in range(ctx.ep_size)],
                                        [ctx.ep_rank + 1] * ctx.ep_size),
            "empty_all_to_all": all_to_all(torch.empty(0, 3), ctx.ep_group, [0] * ctx.ep_size, [0] * ctx.ep_size),
        }
    return out


def test_group_collectives_on_grids():
    layouts = [(2, 2), (4, 1), (1, 4)]
    per_rank = run_on_ranks(group_collectives, 4, layouts, timeout_s=60)
    for tp, ep in layouts:
        layout = ParallelLayout(tp, ep)
        for rank, results in enumerate(per_rank):
            res = results[tp, ep]
            tp_rank, ep_rank = layout.coords(rank)
            tp_ranks, ep_ranks = layout.tp_group_ranks()[ep_rank], layout.ep_group_ranks()[tp_rank]
            assert res["coords"] == (tp_rank, ep_rank)
            assert res["tp_sum"].nonzero().flatten().tolist() == tp_ranks
            assert res["ep_sum"].nonzero().flatten().tolist() == ep_ranks
            assert res["tp_gather"].tolist() == [tp_ranks]
            assert res["ep_gather"].tolist() == [[r] for r in ep_ranks]
            full = torch.arange(2.0 * tp).view(tp, 2) * sum(r + 1 for r in tp_ranks)
            assert torch.equal(res["tp_scatter"], full[tp_rank:tp_rank + 1])
            assert res["ep_broadcast"].item() == ep_ranks[-1]
            # From peer p (ep_rank p), p + 1 rows: the block of rows p sent to this rank.
            expected = [100 * src + ep_rank * (p + 1) + i for p, src in enumerate(ep_ranks) for i in range(p + 1)]
            assert res["ep_all_to_all"].flatten().tolist() == expected
            assert res["empty_all_to_all"].shape == (0, 3)


def test_single_context_collectives_are_identities():
    ctx = ParallelContext.single()
    assert (ctx.rank, ctx.tp_rank, ctx.ep_rank, ctx.world_size, ctx.tp_group, ctx.ep_group) == (0, 0, 0, 1, None, None)
    x = torch.randn(3, 4)
    for collective in (all_reduce, all_gather, reduce_scatter, all_to_all, broadcast):
        assert collective(x, None) is x


def test_init_distributed_rejects_a_world_that_is_not_tp_times_ep(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ValueError, match=r"world size 8 != tp_size 2 x ep_size 2 = 4"):
        init_distributed(2, 2, device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"world size 3 != tp_size 1 x ep_size 4 = 4"):
        init_distributed(1, 4, device="cpu")


def test_init_distributed_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed(device="cpu")
    assert ctx.world_size == 1 and ctx.tp_group is None and not dist.is_initialized()


def torchrun_like_rank(rank, world_size, port, queue):
    "What torchrun does: set the environment, then the script calls init_distributed."
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    try:
        ctx = init_distributed(2, 2, device="cpu", timeout_s=30)
        x = torch.tensor([float(rank)])
        all_reduce(x, ctx.tp_group)
        queue.put((rank, ctx.tp_rank, ctx.ep_rank, dist.get_backend(), x.item()))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as err:
        queue.put((rank, "error", repr(err)))


def test_init_distributed_from_torchrun_environment():
    with socket.socket() as s:  # a free port for this test's env:// rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=torchrun_like_rank, args=(rank, 4, port, queue)) for rank in range(4)]
    for proc in procs:
        proc.start()
    try:
        results = sorted(queue.get(timeout=60) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert results == [(0, 0, 0, "gloo", 1.0), (1, 1, 0, "gloo", 1.0), (2, 0, 1, "gloo", 5.0),
                       (3, 1, 1, "gloo", 5.0)], results


def test_refuses_to_start_from_a_process_with_a_process_group():
    with tempfile.TemporaryDirectory() as store_dir:
        dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=0, world_size=1)
        try:
            with pytest.raises(RuntimeError, match="already has a process group"):
                run_on_ranks(trivial, 2, timeout_s=10)
        finally:
            dist.destroy_process_group()
    assert not dist.is_initialized()
    assert run_on_ranks(trivial, 2, timeout_s=30) == [0, 1]  # and works again once it is destroyed


def peer_never_arrives(kind, timeout_s):
    "Rank 2 never joins; rank 3 waits for it in TP group 1 (ranks 2, 3), or rank 0 in EP group 0 (ranks 0, 2)."
    if kind == "TP":
        ctx = ParallelContext.from_process_group(2, 2, timeout_s=timeout_s)
    else:  # the groups init_distributed builds get the same timeout
        ctx = init_distributed(2, 2, device="cpu", timeout_s=timeout_s)
    if ctx.rank == 2:
        time.sleep(60)  # run_on_ranks stops it once a peer fails
    if kind == "TP" and ctx.rank == 3:
        all_reduce(torch.ones(4), ctx.tp_group)
    if kind == "EP" and ctx.rank == 0:
        all_to_all(torch.ones(2, 4), ctx.ep_group)
    return ctx.rank


@pytest.mark.parametrize("kind, waiting_rank, sentence", [
    ("TP", 3, "all_reduce over TP group 1 (ranks [2, 3]) timed out after {} s waiting for rank 2"),
    ("EP", 0, "all_to_all over EP group 0 (ranks [0, 2]) timed out after {} s waiting for rank 2"),
])
def test_group_collective_times_out_with_one_sentence(kind, waiting_rank, sentence):
    timeout_s = 2.0
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run_on_ranks(peer_never_arrives, 4, kind, timeout_s, timeout_s=60)  # the default group waits 60 s
    elapsed = time.monotonic() - start
    assert timeout_s < elapsed < timeout_s + 5, elapsed  # the group's own timeout, not the default group's
    message = str(info.value)
    assert message.startswith(f"rank {waiting_rank} of 4 failed"), message
    last_line = message.splitlines()[-1]
    pattern = re.escape(sentence).replace(r"\{\}", r"\d+\.\d")
    assert re.fullmatch(r"\S*CollectiveTimeout: " + pattern, last_line), last_line
    waited = float(re.search(r"after (\d+\.\d) s", last_line).group(1))
    assert timeout_s - 0.1 <= waited < timeout_s + 2, waited
    # The backend's own error is kept as the cause.
    assert "The above exception was the direct cause of the following exception" in message
    assert "Timed out waiting 2000ms" in message
    assert not mp.active_children()


@pytest.fixture
def one_rank_group():
    "A named group of one rank in this process, for wrappers whose backend call is replaced."
    with tempfile.TemporaryDirectory() as store_dir:
        dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=0, world_size=1)
        try:
            yield dist.new_group([0], group_desc="EP group 3")
        finally:
            dist.destroy_process_group()


WRAPPED = {"all_reduce": (all_reduce, "all_reduce"), "all_gather": (all_gather, "all_gather"),
           "reduce_scatter": (reduce_scatter, "reduce_scatter"), "all_to_all": (all_to_all, "all_to_all_single"),
           "broadcast": (broadcast, "broadcast")}
BACKEND_TIMEOUTS = [
    "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation "
    "to complete",
    "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE, Timeout(ms)=600000) "
    "ran for 600003 milliseconds before timing out.",
]


@pytest.mark.parametrize("backend_message", BACKEND_TIMEOUTS)
@pytest.mark.parametrize("name", list(WRAPPED))
def test_every_wrapper_names_its_timeout(monkeypatch, one_rank_group, name, backend_message):
    wrapper, backend_call = WRAPPED[name]
    backend_error = RuntimeError(backend_message)

    def times_out(*args, **kwargs):
        time.sleep(0.1)
        raise backend_error

    monkeypatch.setattr(dist, backend_call, times_out)
    with pytest.raises(CollectiveTimeout) as info:
        wrapper(torch.ones(2, 3), one_rank_group)
    assert isinstance(info.value, RuntimeError)  # a launcher catching RuntimeError still catches it
    match = re.fullmatch(rf"{name} over EP group 3 \(ranks \[0\]\) timed out after (\d+\.\d) s", str(info.value))
    assert match and float(match.group(1)) >= 0.1, str(info.value)
    assert info.value.__cause__ is backend_error


@pytest.mark.parametrize("name", list(WRAPPED))
def test_other_backend_errors_pass_through_unchanged(monkeypatch, one_rank_group, name):
    wrapper, backend_call = WRAPPED[name]
    backend_error = RuntimeError("Tensors must be CPU and dense")

    def fails(*args, **kwargs):
        raise backend_error

    monkeypatch.setattr(dist, backend_call, fails)
    with pytest.raises(RuntimeError) as info:
        wrapper(torch.ones(2, 3), one_rank_group)
    assert info.value is backend_error


def test_collectives_per_forward():
    qwen3 = preset("qwen3-30b-a3b")

    def total(config, tp, ep):
        return sum(collectives_per_forward(config, ParallelLayout(tp, ep)).values())

    # Per MoE layer: TP all-reduce after attention, 3 EP all_to_alls, TP all-reduce after the experts;
    # plus the embedding's all-reduce and the LM head's all-gather.
    assert total(qwen3, 2, 4) == total(qwen3, 2, 2) == total(qwen3, 4, 2) == 48 * 5 + 2 == 242
    assert total(qwen3, 8, 1) == total(qwen3, 2, 1) == 48 * 2 + 2 == 98
    assert total(qwen3, 1, 8) == total(qwen3, 1, 2) == 48 * 3 == 144
    assert total(qwen3, 1, 1) == 0
    counts = collectives_per_forward(qwen3, ParallelLayout(2, 4))
    assert counts["MoE split sizes: EP all_to_all"] == counts["MoE rows back: EP all_to_all"] == 48
    assert counts["embedding: TP all-reduce"] == counts["LM head: TP all-gather"] == 1
    dense_ends = ModelConfig.from_dict({**QWEN3_30B_A3B_CONFIG, "mlp_only_layers": [0, 47]})
    assert total(dense_ends, 2, 4) == 46 * 5 + 2 * 2 + 2  # a dense layer has no all_to_all
    assert total(dense_ends, 1, 4) == 46 * 3
