"""Resumable training checkpoints, safetensors only (no pickle anywhere).

A checkpoint folder ``step-N/`` holds the trainable parameters, the optimizer state (tensors in
safetensors, the rest — step counts, hyper-parameters — in JSON), the RNG states, the current safety
subspace when SPF is on, and ``trainer_state.json``. It is written into a temporary folder and renamed,
so a crash never leaves a half-written checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spf.subspace import SafetySubspace

logger = logging.getLogger(__name__)

__all__ = ["latest_checkpoint", "load_checkpoint", "load_extra_tensors", "save_checkpoint"]


def _flatten_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"state": {}, "param_groups": sd["param_groups"]}
    meta.update({k: v for k, v in sd.items() if k not in ("state", "param_groups")})
    for idx, st in sd["state"].items():
        entry: dict[str, Any] = {}
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{idx}.{key}"] = val.detach().cpu().contiguous()
                entry[key] = {"tensor": f"{idx}.{key}"}
            else:
                entry[key] = val
        meta["state"][str(idx)] = entry
    return tensors, meta


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {
            k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in entry.items()
        }
    groups = meta["param_groups"]
    for g in groups:  # JSON turned tuples (betas) into lists; optimizers expect tuples
        for k, v in g.items():
            if isinstance(v, list) and k != "params":
                g[k] = tuple(v)
    out = {k: v for k, v in meta.items() if k not in ("state", "param_groups")}
    out.update({"state": state, "param_groups": groups})
    return out


def _rng_state() -> dict[str, torch.Tensor]:
    np_state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = st
    return out


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    subspace: SafetySubspace | None = None,
    keep_last: int = 2,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """``extra_tensors``: ``{name: tensors}`` written as ``name.safetensors`` inside the same atomic folder
    (e.g. Lisa's proximal anchor); read back with :func:`load_extra_tensors`."""
    ckpt_root = out_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=ckpt_root))
    try:
        params = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(params, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        save_file(_rng_state(), str(tmp / "rng.safetensors"))
        py_state = {"python": repr(random.getstate())}
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step, **py_state}))
        if subspace is not None:
            subspace.save(tmp / "subspace")
        for name, tensors in (extra_tensors or {}).items():
            if not name.isidentifier():
                raise ValueError(f"extra_tensors: {name!r} is not a plain file stem")
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                str(tmp / f"{name}.safetensors"),
            )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(ckpt_root.glob("step-*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = sorted(p for p in (out_dir / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def load_extra_tensors(path: Path, name: str) -> dict[str, torch.Tensor] | None:
    """The ``name`` tensors saved with ``save_checkpoint(extra_tensors=...)``, or None when absent."""
    file = Path(path) / f"{name}.safetensors"
    return load_file(str(file)) if file.is_file() else None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], SafetySubspace | None]:
    """Restore parameters, optimizer and RNG in place; return the trainer state and the saved subspace."""
    params = load_file(str(path / "trainable.safetensors"))
    named = dict(model.named_parameters())
    missing = [n for n in params if n not in named]
    if missing:
        raise ValueError(f"{path}: checkpoint has parameters the model lacks, e.g. {missing[:3]}")
    with torch.no_grad():
        for n, t in params.items():
            named[n].copy_(t.to(named[n].device, named[n].dtype))
    opt_meta = json.loads((path / "optimizer.json").read_text())
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer_state(opt_tensors, opt_meta))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    for key, st in rng.items():
        if key.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state(st, int(key[4:]))
    state = json.loads((path / "trainer_state.json").read_text())
    subspace = SafetySubspace.load(path / "subspace") if (path / "subspace").is_dir() else None
    return state, subspace
