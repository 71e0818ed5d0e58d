"""Chapter 01: the rank grid, simulated ranks (results, failures, hangs, cleanup) and the group collectives."""
import multiprocessing as mp
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

from minisgl.distributed import (ParallelContext, ParallelLayout, RankError, all_gather, all_reduce, all_to_all,
                                 broadcast, init_distributed, reduce_scatter, run_on_ranks)

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


def rank_2_raises(pid_dir):
    open(os.path.join(pid_dir, str(dist.get_rank())), "w").write(str(os.getpid()))
    if dist.get_rank() == 2:
        raise ValueError("boom on rank two")
    dist.all_reduce(torch.ones(1))  # the others wait for rank 2, which never comes


def test_failing_rank_raises_its_traceback_quickly():
    with tempfile.TemporaryDirectory() as pid_dir:
        start = time.monotonic()
        with pytest.raises(RankError) as info:
            run_on_ranks(rank_2_raises, 4, pid_dir, timeout_s=60)
        elapsed = time.monotonic() - start
        pids = [int(open(os.path.join(pid_dir, name)).read()) for name in os.listdir(pid_dir)]
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
    open(os.path.join(pid_dir, str(dist.get_rank())), "w").write(str(os.getpid()))
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
        pids = [int(open(os.path.join(pid_dir, name)).read()) for name in os.listdir(pid_dir)]
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
