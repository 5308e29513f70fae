"""Data-parallel support: one subspace for all ranks.

Under DDP the optimizer step — and so the projection inside SPFOptimizer.step — runs after the gradient
all-reduce, so every rank projects the same update, provided every rank holds the same subspace. Ranks
re-estimating on their own could differ in the last bits (different kernels, non-deterministic
reductions) and the replicas would drift apart; rank 0's estimate is broadcast instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spf.core.subspace import SafetySubspace

__all__ = [
    "DistContext",
    "all_reduce_gradients",
    "barrier",
    "broadcast_parameters",
    "broadcast_subspace",
    "init_from_env",
    "is_distributed",
    "mean_over_ranks",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_subspace(sub: SafetySubspace, src: int = 0) -> SafetySubspace:
    """Overwrite every rank's bases and spectra with rank ``src``'s (shapes must agree, as they do for
    the same model, modules and rank). Tensors are broadcast in place on their current device."""
    if not is_distributed():
        return sub
    for name in sub.modules:
        for t in (*sub.bases[name], sub.spectra[name]):
            buf = t.contiguous()
            dist.broadcast(buf, src=src)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)
    energy = torch.tensor([sub.energy[n] for n in sub.modules], dtype=torch.float64)
    dist.broadcast(energy, src=src)
    sub.energy = {n: float(e) for n, e in zip(sub.modules, energy.tolist(), strict=True)}
    return sub


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run (world 1 = a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> DistContext:
    """Join the process group torchrun / accelerate describe in the environment (``WORLD_SIZE`` > 1).

    An already initialised group (a caller that set one up itself) is used as it is. NCCL on CUDA, gloo on CPU.
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def broadcast_parameters(params: list[torch.Tensor], src: int = 0) -> None:
    """Start every replica from rank ``src``'s weights (as DDP does at construction)."""
    if not is_distributed():
        return
    for p in params:
        dist.broadcast(p.data, src=src)


def all_reduce_gradients(params: list[torch.Tensor]) -> None:
    """Average ``.grad`` over ranks in one flat all-reduce (a missing gradient counts as zero).

    This is DDP's gradient synchronisation, done explicitly after every backward pass of the step (task
    loss, auxiliary terms), so that whatever runs next — clipping, SafeGrad surgery, the SPF projection inside
    the optimizer step — sees the same global gradient on every rank.
    """
    if not is_distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).clone()
        offset += n


def mean_over_ranks(value: float) -> float:
    if not is_distributed():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()
