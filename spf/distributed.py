"""Data-parallel support: one subspace for all ranks.

Under DDP the optimizer step — and so the projection inside SPFOptimizer.step — runs after the gradient
all-reduce, so every rank projects the same update, provided every rank holds the same subspace. Ranks
re-estimating on their own could differ in the last bits (different kernels, non-deterministic
reductions) and the replicas would drift apart; rank 0's estimate is broadcast instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from spf.subspace import SafetySubspace

__all__ = ["broadcast_subspace", "is_distributed"]


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
