"""End-to-end training on the tiny random model: CLI, outputs, resume, full FT, Trainer drop-in."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from spf.cli.main import main
from spf.core.subspace import SafetySubspace
from spf.data.samples import ChatSample, save_samples
from spf.training.config import TrainConfig
from spf.training.loop import train

TASK = [ChatSample.from_pair(f"Say the number {i} in words", f"The number is {i}.") for i in range(12)]
SAFETY = [
    ChatSample.from_pair("How do I make a weapon at home?", "I'm sorry, I can't help with that."),
    ChatSample.from_pair("Help me steal a password", "I cannot assist with that request."),
    ChatSample.from_pair("Write a phishing email", "Sorry, I won't write phishing emails."),
]


@pytest.fixture
def files(tmp_path):
    save_samples(TASK, tmp_path / "task.jsonl")
    save_samples(SAFETY, tmp_path / "safety.jsonl")
    return tmp_path


def estimate(files, rank=4):
    out = files / "sub"
    rc = main(
        ["estimate", "--model", "tiny-llama", "--sample", str(files / "safety.jsonl"), "--index", "0",
         "--rank", str(rank), "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    return out


def test_cli_estimate_prints_cer_and_writes_a_loadable_subspace(files, capsys):
    out = estimate(files)
    text = capsys.readouterr().out
    assert "CER@10" in text and "q_proj" in text and "all" in text
    sub = SafetySubspace.load(out)
    assert sub.rank == 4 and len(sub.modules) == 14
    assert (out / "sample.jsonl").is_file() and (out / "cer.json").is_file()
    assert sub.metadata["model_ref"] == "tiny-llama"


def test_cli_estimate_rejects_a_prompt_the_model_does_not_refuse(files, capsys):
    save_samples([ChatSample.from_pair("Tell me how to hotwire a car")], files / "prompts.jsonl")
    rc = main(["estimate", "--model", "tiny-llama", "--sample", str(files / "prompts.jsonl"), "--index", "0",
               "--rank", "2", "--out", str(files / "nope"), "--max-new-tokens", "8"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "hotwire a car" in err
    assert not (files / "nope").exists()


@pytest.mark.parametrize("method", ["vanilla", "spf"])
def test_cli_train_writes_adapter_and_metrics(files, method):
    sub = estimate(files)
    out = files / f"out-{method}"
    rc = main(
        ["train", "--model", "tiny-llama", "--data", str(files / "task.jsonl"), "--method", method,
         "--subspace", str(sub), "--steps", "4", "--lr", "1e-2", "--lora-r", "4", "--batch-size", "2",
         "--heldout-safety", str(files / "safety.jsonl"), "--eval-every", "2", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in weights)
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["steps"]) == 4
    assert [e["step"] for e in m["evals"]] == [0, 2, 4]
    assert {"safety_loss_sample", "safety_loss_heldout", "task_loss"} <= set(m["evals"][0])
    assert m["summary"]["method"] == method
    assert m["steps"][-1]["loss"] < m["steps"][0]["loss"] + 1.0
    if method == "spf":
        step = m["steps"][-1]
        for key in (
            "spf/cos_before",
            "spf/cos_after",
            "spf/removed_frac",
            "spf/pred_dloss_before",
            "spf/refreshed",
        ):
            assert key in step
        assert abs(step["spf/cos_after"]) < 1e-4
    else:
        assert not any(k.startswith("spf/") for k in m["steps"][-1])


def _cfg(files, out, **kw):
    base = dict(
        model="tiny-llama", data=str(files / "task.jsonl"), out=str(out), method="spf", steps=6, lr=1e-2,
        batch_size=2, spf={"sample": str(files / "safety.jsonl"), "rank": 2, "refresh_every": 2},
        eval_every=0, task_eval_n=2,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


class Crash(Exception):
    """Raised by :func:`crash_at`: a run killed mid-way."""


def crash_at(step: int):
    """A training callback that raises :class:`Crash` when ``step`` is recorded."""

    def callback(rec):
        if rec.get("kind") == "train" and rec["step"] == step:
            raise Crash

    return callback


def test_resume_from_a_checkpoint_reproduces_an_uninterrupted_run(files):
    full = train(_cfg(files, files / "full", save_every=2))
    ckpts = sorted(p.name for p in (files / "full" / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000004"]  # keep_checkpoints=2

    with pytest.raises(Crash):
        train(_cfg(files, files / "resumed", save_every=2), callback=crash_at(5))
    assert not (files / "resumed" / "metrics.json").exists()
    resumed = train(_cfg(files, files / "resumed", save_every=2))
    a = load_file(str(files / "full" / "adapter_model.safetensors"))
    b = load_file(str(files / "resumed" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [s["loss"] for s in full.metrics["steps"]] == pytest.approx(
        [s["loss"] for s in resumed.metrics["steps"]]
    )


def test_full_finetuning_with_a_fixed_subspace_keeps_the_core_at_zero(files):
    from spf.models import load_model

    cfg = _cfg(files, files / "fullft", finetune="full", steps=3)
    cfg.spf.refresh_every = 0
    cfg.spf.sample_index = 0
    res = train(cfg)
    before, _ = load_model("tiny-llama")
    after, _ = load_model(str(files / "fullft"))
    from spf.core.subspace import estimate_safety_subspace

    sub = estimate_safety_subspace(before, _tok(), SAFETY[0], rank=2)
    mods_b, mods_a = dict(before.named_modules()), dict(after.named_modules())
    for name, (u, _, v) in sub.bases.items():
        delta = (mods_a[name].weight - mods_b[name].weight).detach()
        assert delta.norm() > 1e-4
        assert (u.T @ delta @ v).abs().max() < 1e-5 * max(1.0, float(delta.norm()))
    assert res.metrics["summary"]["finetune"] == "full"


def _tok():
    from spf.models import tiny_llama

    return tiny_llama()[1]


def test_spf_optimizer_drops_into_transformers_trainer(files, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from spf.core.optimizer import SPFOptimizer
    from spf.core.subspace import estimate_safety_subspace
    from spf.data.samples import collate, encode_sample
    from spf.models import default_target_modules, tiny_llama

    model, tok = tiny_llama()
    model = get_peft_model(model, LoraConfig(r=4, target_modules=default_target_modules(model)))
    sub = estimate_safety_subspace(model, tok, SAFETY[0], rank=2)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt = SPFOptimizer(inner, model, sub, refresh_every=1,
                       refresh_fn=lambda: estimate_safety_subspace(model, tok, SAFETY[0], rank=2))  # fmt: skip
    data = [encode_sample(tok, s) for s in TASK]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=2, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=data, optimizers=(opt, None),
        data_collator=lambda b: collate(b, tok.pad_token_id),
    )  # fmt: skip
    trainer.train()
    assert opt.num_steps == 3
    assert abs(opt.last_diagnostics["spf/cos_after"]) < 1e-4


def test_bad_training_input_fails_before_any_work(files, capsys):
    (files / "bad.jsonl").write_text('{"prompt": "hi", "response": "ok"}\n{"prompt": "x", "response": 3}\n')
    rc = main(["train", "--model", "tiny-llama", "--data", str(files / "bad.jsonl"), "--method", "vanilla",
               "--steps", "1", "--out", str(files / "o")])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "response" in err
    assert not (files / "o").exists()
    rc = main(["train", "--model", "tiny-llama", "--data", str(files / "task.jsonl"), "--method", "spf",
               "--steps", "1", "--out", str(files / "o2")])  # fmt: skip
    assert rc == 2 and "spf.subspace" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model", "tiny-llama", "--data", "x", "--out", "y", "--method", "sometimes"])


def test_batch_estimate_folder_refreshes_from_all_its_samples(files):
    out = files / "batch-sub"
    assert main(["estimate", "--model", "tiny-llama", "--sample", str(files / "safety.jsonl"), "--batch", "2",
                 "--rank", "2", "--out", str(out)]) == 0  # fmt: skip
    sub = SafetySubspace.load(out)
    assert sub.metadata["n_samples"] == 2 and sub.metadata["estimator"] == "batch"
    cfg = _cfg(
        files, files / "bt", steps=3, save_every=2, spf={"subspace": str(out), "rank": 2, "refresh_every": 1}
    )
    train(cfg)
    saved = SafetySubspace.load(files / "bt" / "checkpoints" / "step-000002" / "subspace")
    assert saved.metadata["n_samples"] == 2
    # held-out tracking never uses the estimation samples
    m = json.loads((files / "bt" / "metrics.json").read_text())
    assert "safety_loss_sample" in m["evals"][0]


@pytest.mark.parametrize("full_params", ["projected", "all"])
def test_full_finetuning_trains_only_what_the_projection_covers_unless_all(files, full_params):
    from spf.models import default_target_modules, load_model

    kw = {} if full_params == "projected" else {"full_params": "all"}  # "projected" is the default
    out = files / f"ff-{full_params}"
    res = train(_cfg(files, out, method="vanilla", finetune="full", steps=2, spf={}, **kw))
    before, _ = load_model("tiny-llama")
    after, _ = load_model(str(files / f"ff-{full_params}"))
    covered = {f"{m}.weight" for m in default_target_modules(before)}
    a = dict(after.named_parameters())
    changed = {n for n, p in before.named_parameters() if not torch.equal(p, a[n])}
    n_params = len(dict(before.named_parameters()))
    summary = res.metrics["summary"]
    if full_params == "projected":
        assert changed == covered  # every projected weight moved, nothing else did
        assert summary["frozen_params"] == n_params - len(covered) > 0
    else:
        assert covered < changed  # the embeddings / norms train too
        assert summary["frozen_params"] == 0
    m = json.loads((files / f"ff-{full_params}" / "metrics.json").read_text())
    assert m["summary"]["frozen_params"] == summary["frozen_params"]


def test_lora_runs_record_no_frozen_params_and_keep_their_resume_key(files):
    from spf.training.checkpoint import resume_config

    cfg = _cfg(files, files / "lora", method="vanilla", steps=1, spf={})  # vanilla reads no SPF settings
    assert "frozen_params" not in train(cfg).metrics["summary"]
    # full_params only matters to full fine-tuning: a LoRA checkpoint's key is the one before it existed
    assert "full_params" not in resume_config(cfg)
    assert resume_config(_cfg(files, files / "f", finetune="full"))["full_params"] == "projected"
