"""Resumable training checkpoints, safetensors only (no pickle anywhere).

A checkpoint folder ``step-N/`` holds the trainable parameters, the optimizer state (tensors in
safetensors, the rest — step counts, hyper-parameters — in JSON), the RNG states (torch, CUDA, numpy,
Python), the current safety subspace when SPF is on, ``trainer_state.json`` and ``manifest.json`` (size
and SHA-256 of every other file, written last). It is built in a temporary ``.step-N.*`` folder, every
file is fsynced, and the folder is renamed into place, so a crash never leaves a half-written
``step-N``; :func:`latest_checkpoint` also re-checks the manifest and skips a folder whose files do not
match it (a disk that lost data), falling back to the previous checkpoint.

:func:`resume_config` is the resume key: the configuration a checkpoint records, which a run must match to
continue it (:func:`check_resume_config`); the pipeline also keys its finetune cache on it. A FINISHED run
(``train_config.json`` in the output folder) is protected the same way (:func:`check_finished_run`): a run
of another configuration into the same folder is refused instead of silently replacing its result.
"""

from __future__ import annotations

import ast
import hashlib
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

from spf.core.subspace import SafetySubspace
from spf.io import OutputError, save_json
from spf.models import unwrap
from spf.training.config import TrainConfig, shown

logger = logging.getLogger(__name__)

__all__ = [
    "FINISHED_CONFIG",
    "SNAPSHOTS",
    "check_finished_run",
    "check_resume_config",
    "discard_partial_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "load_extra_tensors",
    "result_key",
    "resume_config",
    "save_checkpoint",
    "save_finetuned",
    "snapshot_config",
    "snapshot_dir",
    "verify_checkpoint",
]

MANIFEST = "manifest.json"
# Files every checkpoint has (a legacy checkpoint without a manifest must at least have these).
_REQUIRED = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors")
# TrainConfig fields that change how a run is executed or saved, never what it computes: a checkpoint
# written under other values of these may be resumed.
_RESUME_NEUTRAL = ("out", "resume", "save_every", "keep_checkpoints", "snapshot_steps", "threads", "device")
# what a finished run leaves in its output folder: its whole TrainConfig (written with the weights)
FINISHED_CONFIG = "train_config.json"
SNAPSHOTS = "snapshots"  # out/snapshots/step-N/: the fine-tune after step N (TrainConfig.snapshot_steps)


def resume_config(cfg: TrainConfig) -> dict[str, Any]:
    """The configuration a checkpoint records: every field that changes what the run computes."""
    return result_key(cfg.to_dict())


def result_key(config: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration (``train_config.json``, a checkpoint's) without its resume-neutral fields."""
    d = {k: v for k, v in config.items() if k not in _RESUME_NEUTRAL}
    if d.get("finetune") == "lora":
        # full_params only chooses what full fine-tuning trains: leaving it out of a LoRA run's key keeps the
        # checkpoints (and the pipeline's cache keys) written before the field existed valid
        d.pop("full_params", None)
    return d


def save_finetuned(model: nn.Module, tokenizer: Any, folder: Path, config: dict[str, Any]) -> None:
    """What a finished run's output folder holds — the final output and every snapshot alike, so both load
    with :func:`spf.models.load_finetuned`: LoRA, the peft adapter; full fine-tuning, the whole model and
    its tokenizer; then ``train_config.json`` (``config``). save_pretrained writes safetensors, no pickle."""
    if config["finetune"] == "lora":
        model.save_pretrained(str(folder), safe_serialization=True)
    else:
        unwrap(model).save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
    save_json(config, Path(folder) / FINISHED_CONFIG)


def snapshot_dir(out: str | Path, step: int) -> Path:
    """Where the snapshot after optimizer step ``step`` of a run into ``out`` is published."""
    return Path(out) / SNAPSHOTS / f"step-{step}"


def snapshot_config(cfg: TrainConfig, step: int) -> dict[str, Any]:
    """The ``train_config.json`` of the snapshot at ``step``: the configuration of a ``step``-step run,
    whose final output the snapshot equals (the learning-rate schedule never looks at ``steps``)."""
    return {**cfg.to_dict(), "steps": step, "snapshot_steps": [s for s in cfg.snapshot_steps if s < step]}


def check_finished_run(out: Path, cfg: TrainConfig) -> None:
    """Refuse (:class:`OutputError`) to train into ``out`` when it holds a finished run of another
    configuration — two runs (say, two seeds) into one folder would otherwise both report success with
    one result lost. With resume off (``--no-resume``: start over) the old run is replaced, with a warning.
    Keys the saved file lacks (written by an older version) are not compared."""
    file = Path(out) / FINISHED_CONFIG
    if not file.is_file():
        return
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict):
        new = json.loads(json.dumps(resume_config(cfg), default=str))  # tuples → lists, as in the file
        diff = _first_difference(result_key(saved), new, "", shared_only=True)
        found = None if diff is None else f"{diff[0]}: {shown(diff[1])} → {shown(diff[2])}"
    else:
        found = f"{FINISHED_CONFIG} unreadable"
    if found is None:
        return
    if not cfg.resume:
        logger.warning("resume off: starting over in %s, replacing the finished run there (%s)", out, found)
        return
    raise OutputError(
        f"--out {out} holds a finished run of another configuration ({found}); choose another --out, "
        "or pass --no-resume to replace it"
    )


def check_resume_config(ckpt: Path, saved: dict[str, Any] | None, cfg: TrainConfig) -> None:
    """A checkpoint continues only the run that wrote it: any field that changes the result must match."""
    if saved is None:
        logger.warning("%s records no configuration (written by an older version): not checked", ckpt)
        return
    diff = _first_difference(saved, resume_config(cfg), "")
    if diff is not None:
        key, old, new = diff
        raise ValueError(
            f"{ckpt} was written by a run with another configuration ({key}: checkpoint {old!r}, this run "
            f"{new!r}); "
            "resume with the same settings, use another output folder, or start over (resume=False / --no-resume)"
        )


def _first_difference(
    a: Any, b: Any, prefix: str, *, shared_only: bool = False
) -> tuple[str, Any, Any] | None:
    """(dotted key, a's value, b's value) of the first (sorted) key where two configurations differ;
    ``shared_only``: compare only keys both have (a file written by an older version lacks newer keys)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) & set(b) if shared_only else set(a) | set(b)
        for key in sorted(keys):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.", shared_only=shared_only)
            if found:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


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


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensor RNG states (torch, CUDA, numpy's key array) and the JSON rest (numpy's position, Python's)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = st
    rest = {
        "numpy": {
            "kind": kind,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": repr(random.getstate()),
    }
    return tensors, rest


def _restore_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    for key, st in tensors.items():
        if key.startswith("cuda") and torch.cuda.is_available() and int(key[4:]) < torch.cuda.device_count():
            torch.cuda.set_rng_state(st, int(key[4:]))
    np_rest = state.get("numpy")
    if np_rest is not None and "numpy_keys" in tensors:
        keys = tensors["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (np_rest["kind"], keys, np_rest["pos"], np_rest["has_gauss"], np_rest["cached_gaussian"])
        )
    py = state.get("python")
    if isinstance(py, str):
        random.setstate(ast.literal_eval(py))  # (version, tuple of ints, gauss): literals only


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk: a rename is only as durable as what it points at."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


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
        rng_tensors, rng_rest = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step, "rng": rng_rest}))
        if subspace is not None:
            subspace.save(tmp / "subspace")
        for name, tensors in (extra_tensors or {}).items():
            if not name.isidentifier():
                raise ValueError(f"extra_tensors: {name!r} is not a plain file stem")
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                str(tmp / f"{name}.safetensors"),
            )
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files
        }
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
        for p in [*files, tmp / MANIFEST, *(d for d in tmp.rglob("*") if d.is_dir()), tmp]:
            _fsync(p)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(ckpt_root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(ckpt_root.glob("step-*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def verify_checkpoint(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is.

    Complete: ``trainer_state.json`` parses, and every file the manifest lists has its recorded size and
    SHA-256. (A checkpoint from before manifests existed passes when its required files are present.)
    """
    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError) as exc:
        return f"trainer_state.json unreadable ({exc})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "trainer_state.json has no step"
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        missing = [name for name in _REQUIRED if not (path / name).is_file()]
        return f"no {MANIFEST} and missing {missing}" if missing else None
    try:
        files = json.loads(manifest_file.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} unreadable ({exc})"
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} missing"
        if f.stat().st_size != want["size"]:
            return f"{rel} has {f.stat().st_size} bytes, manifest says {want['size']}"
        if _sha256(f) != want["sha256"]:
            return f"{rel} does not match its SHA-256 in {MANIFEST}"
    return None


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete ``checkpoints/step-N`` under ``out_dir``; incomplete or corrupted ones are
    skipped with a warning (temporary ``.step-N.*`` folders of an interrupted save never match)."""
    for path in sorted((Path(out_dir) / "checkpoints").glob("step-*"), reverse=True):
        if not path.is_dir():
            continue
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        logger.warning("skipping checkpoint %s: %s", path, problem)
    return None


def discard_partial_checkpoints(out_dir: Path) -> list[Path]:
    """Remove temporary folders a killed :func:`save_checkpoint` left behind; return what was removed."""
    removed = []
    for tmp in (Path(out_dir) / "checkpoints").glob(".step-*"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


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
    state = json.loads((path / "trainer_state.json").read_text())
    _restore_rng(
        load_file(str(path / "rng.safetensors")), state.get("rng") or {"python": state.get("python")}
    )
    subspace = SafetySubspace.load(path / "subspace") if (path / "subspace").is_dir() else None
    return state, subspace
