"""Hostile model and adapter folders (issue 14, "Subspace and model files"): empty or truncated safetensors,
a weight of the wrong shape or missing, a malformed config.json / adapter_config.json. Each is a
ModelLoadError naming the file (exit 2 from the CLI, one line), raised before anything is written — never a
traceback, and never a model that silently random-initialises what it could not load."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spf.cli.main import main
from spf.data.samples import ChatSample, save_samples
from spf.models import ModelLoadError, load_finetuned, load_model, tiny_llama
from tests.helpers import tree_state

torch.set_num_threads(1)

WEIGHT = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model, tok = tiny_llama()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama()[0], LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder


def _rewrite(path: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# each: (id, how the model folder is broken, the file the message names, a regex it must match)
MODEL_CASES = [
    ("weights-empty", lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors", "empty file"),
    ("weights-truncated", lambda f: _truncate(f / "model.safetensors"), "model.safetensors",
     "not readable safetensors, truncated"),
    ("weight-wrong-shape", lambda f: _rewrite(f / "model.safetensors", lambda t: t.update({WEIGHT: torch.zeros(10, 64)})),
     "model.safetensors", rf"tensor '{WEIGHT}' has shape \[10, 64\], config\.json expects \[64, 64\]"),
    ("weight-missing", lambda f: _rewrite(f / "model.safetensors", lambda t: t.pop(WEIGHT)),
     "model.safetensors", rf"1 weight\(s\) missing .*'{WEIGHT}'"),
    ("config-invalid-json", lambda f: (f / "config.json").write_text('{"model_type": "llama",'),
     "config.json", "not valid JSON"),
    ("config-not-an-object", lambda f: (f / "config.json").write_text('["llama"]'),
     "config.json", "expected a JSON object, got list"),
    ("config-unknown-model-type", lambda f: (f / "config.json").write_text('{"model_type": "nonexistent"}'),
     "config.json", "rejected by transformers"),
    ("config-field-of-wrong-type", lambda f: _edit_json(f / "config.json", hidden_size="abc"),
     "config.json", "rejected by transformers .*hidden_size"),
    ("config-without-model-type", lambda f: (f / "config.json").write_text("{}"),
     "config.json", "rejected by transformers"),
]  # fmt: skip


def _edit_json(path: Path, **values) -> None:
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("break_it", "name", "pattern"), [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES]
)
def test_load_model_refuses_a_broken_model_folder(model_dir, break_it, name, pattern):
    break_it(model_dir)
    before = tree_state(model_dir.parent)
    with pytest.raises(ModelLoadError, match=pattern) as info:
        load_model(str(model_dir))
    assert str(model_dir / name) in str(info.value)
    assert tree_state(model_dir.parent) == before


@pytest.mark.parametrize(
    ("break_it", "name", "pattern"),
    [MODEL_CASES[i][1:] for i in (1, 2, 5)],
    ids=[MODEL_CASES[i][0] for i in (1, 2, 5)],
)
def test_spf_train_on_a_broken_model_folder_exits_2_and_writes_nothing(
    model_dir, capsys, break_it, name, pattern
):
    tmp = model_dir.parent
    save_samples([ChatSample.from_pair("Name a colour", "Blue.")] * 2, tmp / "task.jsonl")
    break_it(model_dir)
    before = tree_state(tmp)
    rc = main(["train", "--model", str(model_dir), "--data", str(tmp / "task.jsonl"), "--method", "vanilla", "--steps", "1",
               "--batch-size", "2", "--out", str(tmp / "out")])  # fmt: skip
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # what precedes it is transformers' progress bar
    assert rc == 2 and last.startswith("spf: error: ") and "Traceback" not in err
    assert str(model_dir / name) in last
    assert tree_state(tmp) == before


ADAPTER_CASES = [
    ("weights-empty", lambda f: (f / "adapter_model.safetensors").write_bytes(b""),
     "adapter_model.safetensors", "empty file"),
    ("weights-truncated", lambda f: _truncate(f / "adapter_model.safetensors"),
     "adapter_model.safetensors", "not readable safetensors, truncated"),
    ("weight-wrong-shape", lambda f: _rewrite(f / "adapter_model.safetensors", _widen_first),
     "adapter", "size mismatch"),
    ("weight-missing", lambda f: _rewrite(f / "adapter_model.safetensors", _drop_first),
     "adapter_model.safetensors", r"1 adapter tensor\(s\) missing"),
    ("config-invalid-json", lambda f: (f / "adapter_config.json").write_text("{'r': 2}"),
     "adapter_config.json", "not valid JSON"),
    ("config-not-an-object", lambda f: (f / "adapter_config.json").write_text("2"),
     "adapter_config.json", "expected a JSON object, got int"),
    ("config-without-peft-type", lambda f: (f / "adapter_config.json").write_text('{"r": 2}'),
     "adapter_config.json", "'peft_type' missing"),
    ("config-unknown-peft-type", lambda f: _edit_json(f / "adapter_config.json", peft_type="NOPE"),
     "adapter", "could not load the adapter"),
]  # fmt: skip


def _widen_first(t: dict) -> None:
    key = sorted(t)[0]
    t[key] = torch.zeros(t[key].shape[0] + 1, *t[key].shape[1:])


def _drop_first(t: dict) -> None:
    del t[sorted(t)[0]]


@pytest.mark.parametrize(
    ("break_it", "name", "pattern"), [c[1:] for c in ADAPTER_CASES], ids=[c[0] for c in ADAPTER_CASES]
)
def test_load_finetuned_refuses_a_broken_adapter_folder(adapter_dir, break_it, name, pattern):
    break_it(adapter_dir)
    before = tree_state(adapter_dir.parent)
    with pytest.raises(ModelLoadError, match=pattern) as info:
        load_finetuned("tiny-llama", adapter_dir)
    assert (
        str(adapter_dir / name) in str(info.value)
        if name != "adapter"
        else str(adapter_dir) in str(info.value)
    )
    assert tree_state(adapter_dir.parent) == before


@pytest.mark.parametrize(
    ("break_it", "name", "pattern"),
    [ADAPTER_CASES[i][1:] for i in (1, 5)],
    ids=[ADAPTER_CASES[i][0] for i in (1, 5)],
)
def test_spf_eval_on_a_broken_adapter_exits_2_and_writes_nothing(
    adapter_dir, capsys, break_it, name, pattern
):
    tmp = adapter_dir.parent
    break_it(adapter_dir)
    before = tree_state(tmp)
    rc = main(["eval", "--model", "tiny-llama", "--adapter", str(adapter_dir), "--suite", "harmful",
               "--max-new-tokens", "2", "--out", str(tmp / "out")])  # fmt: skip
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # what precedes it is transformers' progress bar
    assert rc == 2 and last.startswith("spf: error: ") and "Traceback" not in err
    assert str(adapter_dir / name) in last
    assert tree_state(tmp) == before


def test_load_finetuned_refuses_a_folder_that_is_neither(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"out is neither a LoRA adapter folder .* nor a full fine-tune"):
        load_finetuned("tiny-llama", tmp_path / "out")
    with pytest.raises(ModelLoadError, match=r"missing does not exist"):
        load_finetuned("tiny-llama", tmp_path / "missing")
