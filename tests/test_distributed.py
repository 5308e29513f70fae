"""Two-process gloo data parallelism: DDP + SPFOptimizer keep the replicas identical and projected."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from spf.optimizer import SPFOptimizer
from tests.helpers import TINY_SHAPES, TinyNet, random_subspace

SHAPES = TINY_SHAPES


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = TinyNet()
    model = DDP(net)
    calls = []

    def refresh():
        # each rank would estimate a *different* subspace (rank-dependent seed): rank 0's must win
        calls.append(1)
        return random_subspace(SHAPES, rank=3, seed=100 * rank + len(calls))

    opt = SPFOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), net, None, refresh_every=2, refresh_fn=refresh
    )
    w0 = {n: getattr(net, n).weight.detach().clone() for n in SHAPES}
    gen = torch.Generator().manual_seed(rank)  # each rank sees different data
    for _ in range(4):
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 8, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    torch.save(
        {
            "weights": {n: getattr(net, n).weight.detach() for n in SHAPES},
            "w0": w0,
            "final_bases": {n: b[0] for n, b in opt.subspace.bases.items()},
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ranks_stay_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for n in SHAPES:
        torch.testing.assert_close(r0["weights"][n], r1["weights"][n], rtol=0, atol=0)
        torch.testing.assert_close(r0["final_bases"][n], r1["final_bases"][n], rtol=0, atol=0)
        assert not torch.equal(r0["weights"][n], r0["w0"][n])
