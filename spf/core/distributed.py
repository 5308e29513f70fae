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
    """Overwrite every rank's bases, spectra and energies with rank ``src``'s, in place, on each tensor's
    own device (the same model, modules and rank on every rank).

    A module's effective rank k (directions above the noise floor, :mod:`spf.core.gradients`) can differ
    between ranks by a direction that sits at the floor, so the shapes are sent first and a rank whose
    k differs receives into a buffer of ``src``'s shape."""
    if not is_distributed():
        return sub
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    names = sub.modules
    sizes = torch.tensor(
        [[sub.bases[n][0].shape[1], sub.spectra[n].numel()] for n in names], dtype=torch.long, device=comm
    )
    dist.broadcast(sizes, src=src)
    for name, (k, n_spec) in zip(names, sizes.tolist(), strict=True):
        u, s, v = sub.bases[name]
        shapes = ((u.shape[0], k), (k,), (v.shape[0], k), (n_spec,))
        u, s, v, spec = (
            _broadcast_tensor(t, shape, src, comm)
            for t, shape in zip((u, s, v, sub.spectra[name]), shapes, strict=True)
        )
        sub.bases[name], sub.spectra[name] = (u, s, v), spec
    energy = torch.tensor([sub.energy[n] for n in names], dtype=torch.float64, device=comm)
    dist.broadcast(energy, src=src)
    sub.energy = {n: float(e) for n, e in zip(names, energy.tolist(), strict=True)}
    if "effective_rank" in sub.metadata:
        sub.metadata["effective_rank"] = sub.effective_rank
    return sub


def _broadcast_tensor(t: torch.Tensor, shape: tuple, src: int, comm: torch.device | None) -> torch.Tensor:
    """``src``'s tensor of ``shape``: ``t`` itself (overwritten) when the shape and device allow, else a new
    tensor on ``t``'s device (NCCL sends only CUDA tensors: ``comm`` is the device it sends from)."""
    device = comm if comm is not None else t.device
    if tuple(t.shape) == tuple(shape) and t.device == device and t.is_contiguous():
        dist.broadcast(t, src=src)
        return t
    buf = t.to(device).contiguous() if tuple(t.shape) == tuple(shape) else t.new_empty(shape, device=device)
    dist.broadcast(buf, src=src)
    if tuple(t.shape) == tuple(shape):
        t.copy_(buf)
        return t
    return buf.to(t.device)


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
