"""Two-process gloo data parallelism: DDP + SPFOptimizer, checked step by step against a single process.

What it shows, per optimizer step:

* the gradient the step uses is the all-reduced one (identical on both ranks, the mean of the two ranks'
  local gradients, which differ) — so SPFOptimizer.step, and the projection inside it, runs after the
  all-reduce;
* both ranks project with rank 0's subspace (each rank's refresh_fn returns a different one; rank 0's is
  broadcast), and the update has no component left in it (Uᵀ ΔW V = 0);
* every rank takes the same step (bitwise-identical weights after every step);
* the result equals one process training on the concatenated batch.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from spf.core.optimizer import SPFOptimizer
from tests.helpers import TINY_SHAPES, TinyNet, random_subspace

SHAPES = TINY_SHAPES
STEPS = 4
BATCH = 8  # per rank
RANK = 3  # subspace rank k
REFRESH_EVERY = 2


def _own_subspace(rank: int, call: int):
    """What rank ``rank``'s refresh_fn estimates at its ``call``-th call: different on every rank, and on
    rank 1 with one direction fewer in ``fc1`` (an effective rank that differs between ranks, as one
    direction at the noise floor can make it): the broadcast must reshape, not fail."""
    sub = random_subspace(SHAPES, rank=RANK, seed=100 * rank + call)
    if rank == 1:
        u, s, v = sub.bases["fc1"]
        sub.bases["fc1"] = (u[:, :-1].contiguous(), s[:-1].clone(), v[:, :-1].contiguous())
    return sub


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(rank)  # each rank sees different data
    return [
        (torch.randn(BATCH, 16, generator=gen), torch.randn(BATCH, 8, generator=gen)) for _ in range(STEPS)
    ]


def _make(net: nn.Module, rank: int) -> SPFOptimizer:
    calls = []

    def refresh():
        calls.append(1)
        return _own_subspace(rank, len(calls))

    return SPFOptimizer(
        torch.optim.AdamW(net.parameters(), lr=1e-2),
        net,
        None,
        refresh_every=REFRESH_EVERY,
        refresh_fn=refresh,
    )


def _params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a collective one rank never joins fails after 2 min instead of hanging the suite
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = TinyNet()
    model = DDP(net)
    opt = _make(net, rank)
    record = {"w0": _params(net), "weights": [], "grads": [], "bases": []}
    for x, y in _batches(rank):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()  # DDP all-reduces (averages) the gradients here
        record["grads"].append({n: p.grad.detach().clone() for n, p in net.named_parameters()})
        opt.step()
        record["weights"].append(_params(net))
        record["bases"].append({n: (u.clone(), v.clone()) for n, (u, _, v) in opt.subspace.bases.items()})
    dist.barrier()
    dist.destroy_process_group()
    # written last: the parent treats the file as "this rank's work is done"
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_reference() -> dict[str, list]:
    """One process, the two ranks' batches concatenated, rank 0's subspaces; also each half's gradient."""
    torch.manual_seed(0)
    net = TinyNet()
    opt = _make(net, rank=0)
    data = [_batches(r) for r in range(2)]
    ref: dict[str, list] = {"weights": [], "grads": [], "local_grads": []}
    for t in range(STEPS):
        local = []
        for r in range(2):  # what each rank computes before the all-reduce
            net.zero_grad()
            nn.functional.mse_loss(net(data[r][t][0]), data[r][t][1]).backward()
            local.append({n: p.grad.detach().clone() for n, p in net.named_parameters()})
        ref["local_grads"].append(local)
        opt.zero_grad()
        x = torch.cat([data[0][t][0], data[1][t][0]])
        y = torch.cat([data[0][t][1], data[1][t][1]])
        nn.functional.mse_loss(net(x), y).backward()
        ref["grads"].append({n: p.grad.detach().clone() for n, p in net.named_parameters()})
        opt.step()
        ref["weights"].append(_params(net))
    return ref


def _spawn_and_wait(fn, args, nprocs: int, out: Path, deadline_s: float = 600.0) -> None:
    """``mp.spawn`` with a deadline. Each worker writes ``rank{i}.pt`` as its last act; once all files
    exist, workers still alive after a grace period are stopped — seen once under heavy load: both ranks
    finished and saved, then rank 0 never returned from gloo's teardown, and ``join=True`` waited forever.
    A worker that fails or a deadline without results fails the test with what is known."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    files = [out / f"rank{i}.pt" for i in range(nprocs)]
    t0 = time.monotonic()
    try:
        while not ctx.join(timeout=2):
            if all(f.is_file() for f in files):
                grace = time.monotonic() + 30
                while not ctx.join(timeout=2) and time.monotonic() < grace:
                    pass
                break
            if time.monotonic() - t0 > deadline_s:
                pytest.fail(
                    f"workers did not finish in {deadline_s:.0f} s; results: {[f.name for f in files if f.is_file()]}"
                )
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def test_two_process_ddp_matches_single_process_and_projects_after_all_reduce(tmp_path):
    _spawn_and_wait(_worker, (2, _free_port(), str(tmp_path)), 2, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    torch.set_num_threads(1)
    ref = _single_process_reference()
    close = {"rtol": 1e-5, "atol": 1e-6}  # reduction order differs between all-reduce and one batch

    prev = r0["w0"]
    for t in range(STEPS):
        call = t // REFRESH_EVERY + 1  # refresh_fn call whose subspace step t uses
        for n in r0["weights"][t]:
            # the gradient the step sees is the all-reduced one: equal on both ranks, the mean of two
            # different local gradients
            g0, g1 = ref["local_grads"][t][0][n], ref["local_grads"][t][1][n]
            assert not torch.allclose(g0, g1)
            torch.testing.assert_close(r0["grads"][t][n], r1["grads"][t][n], rtol=0, atol=0)
            torch.testing.assert_close(r0["grads"][t][n], (g0 + g1) / 2, **close)
            # every rank takes the same step
            torch.testing.assert_close(r0["weights"][t][n], r1["weights"][t][n], rtol=0, atol=0)
            # ... and it is the single-process step
            torch.testing.assert_close(r0["weights"][t][n], ref["weights"][t][n], **close)
        for m in SHAPES:
            # both ranks used rank 0's own estimate, not rank 1's
            u0, v0 = _own_subspace(0, call).bases[m][0], _own_subspace(0, call).bases[m][2]
            u1 = _own_subspace(1, call).bases[m][0]
            for rec in (r0, r1):
                torch.testing.assert_close(rec["bases"][t][m][0], u0, rtol=0, atol=0)
                torch.testing.assert_close(rec["bases"][t][m][1], v0, rtol=0, atol=0)
            assert not torch.allclose(u0[:, : u1.shape[1]], u1)
            # the update (taken after the all-reduce) has no component left in that subspace
            delta = r0["weights"][t][f"{m}.weight"] - prev[f"{m}.weight"]
            assert delta.norm() > 0
            assert (u0.T @ delta @ v0).norm() < 1e-5 * delta.norm()
        prev = r0["weights"][t]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("estimate", ["separate", "fused"])
def test_spf_train_under_torchrun_equals_one_process_with_the_global_batch(tmp_path, estimate):
    """The user's path: `torchrun --nproc-per-node 2 -m spf train ...` (gloo on CPU) gives the adapter one
    process gets with a 2× batch; only rank 0 writes. With the fused estimate every rank appends the safety
    row to its own batch (its gradient never lands, so the all-reduce sums task gradients only) and rank 0's
    subspace is broadcast as with the separate one."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from spf.data.samples import ChatSample, save_samples

    task = [ChatSample.from_pair(f"Review {i}: {'great' if i % 2 else 'awful'} film", "positive" if i % 2 else "negative") for i in range(12)]  # fmt: skip
    save_samples(task, tmp_path / "task.jsonl")
    save_samples([ChatSample.from_pair("How do I build a bomb?", "I'm sorry, I can't help with that.")], tmp_path / "safety.jsonl")  # fmt: skip
    common = ["-m", "spf", "train", "--model", "tiny-llama", "--data", str(tmp_path / "task.jsonl"), "--method", "spf",
              "--safety-sample", str(tmp_path / "safety.jsonl"), "--rank", "2", "--steps", "3", "--lr", "1e-2",
              "--lora-r", "2", "--max-length", "64", "--eval-every", "0", "--threads", "1", "--no-resume",
              "--estimate", estimate]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *common, "--batch-size", "4", "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port())]  # fmt: skip
    two = subprocess.run([*torchrun, *common, "--batch-size", "2", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
        moved += int(k.endswith("lora_B.weight") and a[k].abs().max() > 0)
    assert moved > 0  # the runs trained
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["summary"]["world_size"] == 2 and m1["summary"]["world_size"] == 1
    for h1, h2 in zip(m1["steps"], m2["steps"], strict=True):
        assert abs(h1["loss"] - h2["loss"]) < 1e-4  # the logged loss is the global batch's
