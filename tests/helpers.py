"""Small builders shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from spf.core.subspace import SafetySubspace

TINY_SHAPES = {"fc1": (32, 16), "fc2": (8, 32)}  # (out, in) = (m, n) of TinyNet's layers


class TinyNet(nn.Module):
    """Two linear layers: the smallest net with distinct left/right subspace sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def orthonormal(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    return q


def random_subspace(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> SafetySubspace:
    """A subspace from the SVD of a random low-rank 'gradient' per module."""
    gen = torch.Generator().manual_seed(seed)
    bases, energy, spectra = {}, {}, {}
    for name, (m, n) in shapes.items():
        g = torch.randn(m, 2 * rank, generator=gen) @ torch.randn(2 * rank, n, generator=gen)
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        bases[name] = (u[:, :rank].contiguous(), s[:rank].clone(), vh[:rank].T.contiguous())
        energy[name] = float((s**2).sum())
        spectra[name] = s[: 4 * rank].clone()
    return SafetySubspace(bases, energy, spectra, rank, {"model_ref": "random"})


def stage_workspace(
    root, finetune=None, stages=("prepare", "align", "estimate"), estimate=None, evaluate=None
):
    """A pipeline workspace under ``root`` on the tiny model (``spf.pipeline.params.smoke_params``, 1 thread, with
    ``finetune`` / ``estimate`` overrides): ``params.yaml`` written and ``stages`` run in-process. Returns (root, params)."""
    import contextlib
    from pathlib import Path

    import yaml

    from spf.pipeline.params import PipelineParams
    from spf.pipeline.presets import smoke_params
    from spf.pipeline.stages import run_stage

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    params = smoke_params()
    params["finetune"].update(finetune or {})
    params["estimate"].update(estimate or {})
    params["evaluate"].update(evaluate or {})
    params["runtime"] = {"threads": 1}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with contextlib.chdir(root):
        p = PipelineParams.from_dict(params, source="params.yaml")
        for stage in stages:
            run_stage(stage, p)
    return root, params


def tree_state(*roots) -> dict[str, tuple]:
    """Everything under ``roots`` (hidden files and empty folders included) as ``{path: (kind, mode, sha256)}``:
    the hostile-input tests assert that a refused command leaves this unchanged."""
    import hashlib
    import stat
    from pathlib import Path

    state: dict[str, tuple] = {}
    for root in map(Path, roots):
        if not root.exists() and not root.is_symlink():
            state[str(root)] = ("absent",)
            continue
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                state[str(p)] = ("link", str(p.readlink()))
            elif stat.S_ISREG(st.st_mode):
                state[str(p)] = ("file", st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                state[str(p)] = ("other", st.st_mode)
    return state
