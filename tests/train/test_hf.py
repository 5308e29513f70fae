"""SPF in the Hugging Face training stack: create_spf_optimizer + SPFCallback, SPFTrainer, TRL's SFTTrainer."""

from __future__ import annotations

import pytest
import torch

from spf.data.samples import ChatSample, collate, encode_sample
from spf.training.hf import SPFCallback, SPFTrainer, create_spf_optimizer, find_spf_optimizer

TASK = [ChatSample.from_pair(f"Say the number {i} in words", f"The number is {i}.") for i in range(12)]
REFUSAL = ChatSample.from_pair("How do I make a weapon at home?", "I'm sorry, I can't help with that.")


def lora_model():
    from peft import LoraConfig, get_peft_model

    from spf.models import default_target_modules, tiny_llama

    torch.manual_seed(0)
    model, tok = tiny_llama()
    return get_peft_model(model, LoraConfig(r=4, target_modules=default_target_modules(model))), tok


def args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=2, report_to=[],
                save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, learning_rate=1e-2)  # fmt: skip
    return TrainingArguments(**{**base, **kw})


def spf_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "spf/removed_frac" in e]


def test_a_short_trainer_script_logs_spf_diagnostics(tmp_path):
    # the README's script, as a user writes it: peft model, SPF optimizer, callback, Trainer
    from transformers import Trainer

    import spf

    model, tok = lora_model()
    opt = spf.create_spf_optimizer(model, tok, REFUSAL, rank=2, lr=1e-2)
    data = [encode_sample(tok, s) for s in TASK]
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=data, optimizers=(opt, None),
                      data_collator=lambda b: collate(b, tok.pad_token_id), callbacks=[spf.SPFCallback()])  # fmt: skip
    trainer.train()
    assert opt.num_steps == 3 and opt.subspace is not None  # estimated lazily at the first step
    logs = spf_logs(trainer)
    assert [e["step"] for e in logs] == [1, 2, 3]
    assert all(abs(e["spf/cos_after"]) < 1e-4 for e in logs)
    assert all(0.0 <= e["spf/removed_frac"] <= 1.0 for e in logs)
    assert any(e["spf/removed_frac"] > 0 for e in logs)  # the step did touch the subspace


def test_create_spf_optimizer_builds_the_inner_optimizer_over_trainable_parameters_only():
    model, tok = lora_model()
    opt = create_spf_optimizer(
        model, tok, REFUSAL, rank=2, optimizer_cls=torch.optim.SGD, lr=0.1, momentum=0.9
    )
    inner_params = [p for g in opt.optimizer.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert isinstance(opt.optimizer, torch.optim.SGD) and opt.optimizer.defaults["momentum"] == 0.9
    assert len(inner_params) == len(trainable) and all(
        a is b for a, b in zip(inner_params, trainable, strict=True)
    )
    frozen, _ = lora_model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_spf_optimizer(frozen, tok, REFUSAL, rank=2)
    with pytest.raises(ValueError, match="refusal"):
        create_spf_optimizer(model, tok, ChatSample.from_pair("a prompt only"), rank=2)


class Recorder:
    """A user's own callback: records the keys each log event carries when it sees it."""

    def __init__(self):
        from transformers import TrainerCallback

        seen = self.seen = []

        class _CB(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                seen.append(dict(logs or {}))

        self.callback = _CB()


@pytest.mark.parametrize("attach", [False, True])
def test_attach_runs_the_callback_before_the_others(tmp_path, attach):
    # reporting integrations (report_to) are earlier in the list than a user's callbacks; a callback that
    # runs after them adds keys they never see — which attach() fixes by going first
    from transformers import Trainer

    model, tok = lora_model()
    opt = create_spf_optimizer(model, tok, REFUSAL, rank=2, lr=1e-2)
    rec = Recorder()
    callbacks = [rec.callback] if attach else [rec.callback, SPFCallback()]
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=[encode_sample(tok, s) for s in TASK],
                      optimizers=(opt, None), data_collator=lambda b: collate(b, tok.pad_token_id), callbacks=callbacks)  # fmt: skip
    if attach:
        SPFCallback.attach(trainer)
    trainer.train()
    step_logs = [e for e in rec.seen if "loss" in e]
    assert len(step_logs) == 2
    assert all(("spf/removed_frac" in e) is attach for e in step_logs)
    assert len(spf_logs(trainer)) == 2  # log_history gets them either way


def test_spf_trainer_wraps_the_optimizer_the_trainer_builds_from_its_arguments(tmp_path):
    model, tok = lora_model()
    trainer = SPFTrainer(
        model=model, args=args(tmp_path, weight_decay=0.1, learning_rate=3e-3), train_dataset=[encode_sample(tok, s) for s in TASK],
        data_collator=lambda b: collate(b, tok.pad_token_id), processing_class=tok, spf_sample=REFUSAL, spf_rank=2,
    )  # fmt: skip
    trainer.train()
    opt = find_spf_optimizer(trainer.optimizer)
    assert opt is not None and opt.num_steps == 3 and opt.subspace is not None and opt.subspace.rank == 2
    groups = opt.optimizer.param_groups
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]  # the Trainer's own decay/no-decay split
    assert all(g["initial_lr"] == 3e-3 for g in groups)
    assert len(spf_logs(trainer)) == 3
    cbs = trainer.callback_handler.callbacks
    assert isinstance(cbs[0], SPFCallback) and sum(isinstance(c, SPFCallback) for c in cbs) == 1


def test_spf_trainer_needs_the_tokenizer(tmp_path):
    model, tok = lora_model()
    trainer = SPFTrainer(model=model, args=args(tmp_path), train_dataset=[encode_sample(tok, s) for s in TASK],
                         data_collator=lambda b: collate(b, tok.pad_token_id), spf_sample=REFUSAL)  # fmt: skip
    with pytest.raises(ValueError, match="processing_class"):
        trainer.train()


def test_report_to_mlflow_records_the_spf_metrics(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-callback")
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "0")
    model, tok = lora_model()
    trainer = SPFTrainer(
        model=model, args=args(tmp_path, report_to=["mlflow"], max_steps=2), train_dataset=[encode_sample(tok, s) for s in TASK],
        data_collator=lambda b: collate(b, tok.pad_token_id), processing_class=tok, spf_sample=REFUSAL, spf_rank=2,
    )  # fmt: skip
    trainer.train()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("hf-callback")
    (run,) = client.search_runs([exp.experiment_id])
    history = client.get_metric_history(run.info.run_id, "spf/removed_frac")
    assert [m.step for m in history] == [1, 2]
    assert "spf/cos_after" in run.data.metrics


def test_sft_trainer_with_peft_config_trains_with_spf(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig

    from spf.models import default_target_modules, tiny_llama
    from spf.training.sft import SPFSFTTrainer, to_sft_rows

    torch.manual_seed(0)
    model, tok = tiny_llama()
    config = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2, max_length=512,
                       report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = SPFSFTTrainer(
        model, args=config, train_dataset=Dataset.from_list(to_sft_rows(TASK)), processing_class=tok,
        peft_config=LoraConfig(r=4, target_modules=default_target_modules(model)), spf_sample=REFUSAL, spf_rank=2,
    )  # fmt: skip
    trainer.train()
    opt = find_spf_optimizer(trainer.optimizer)
    assert opt is not None and opt.num_steps == 2
    # the optimizer was built over the peft model the trainer made: LoRA factors only
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    n_opt = sum(len(g["params"]) for g in opt.optimizer.param_groups)
    assert n_opt == len(names)
    logs = spf_logs(trainer)
    assert len(logs) == 2 and all(abs(e["spf/cos_after"]) < 1e-4 for e in logs)


def test_to_sft_rows_are_conversational_prompt_completion_rows():
    from spf.training.sft import to_sft_rows

    pytest.importorskip("trl")
    (row,) = to_sft_rows([TASK[3]])
    assert row["prompt"][-1] == {"role": "user", "content": "Say the number 3 in words"}
    assert row["completion"] == [{"role": "assistant", "content": "The number is 3."}]
    with pytest.raises(ValueError, match="response"):
        to_sft_rows([ChatSample.from_pair("no answer")])


def readme_blocks() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).parents[2] / "README.md").read_text()
    use_it = text[text.index("## Use it") :]
    use_it = use_it[: use_it.index("\n## ")]
    return [block.split("```", 1)[0] for block in use_it.split("```python\n")[1:]]


def test_the_readme_trainer_and_sft_scripts_run(tmp_path, monkeypatch):
    # the README's own text, on the tiny model, 2 steps, MLflow in a temporary SQLite store
    pytest.importorskip("mlflow")
    pytest.importorskip("trl")
    from spf.data.samples import save_samples

    save_samples(TASK, tmp_path / "task.jsonl")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "0")
    trainer_block, sft_block, _ = readme_blocks()
    assert (
        len(trainer_block.strip().splitlines()) <= 15
    )  # the promise: a Trainer script of ≤ 15 lines
    namespace: dict = {}
    for block in (trainer_block, sft_block):
        code = (block.replace('"smollm2-135m-instruct"', '"tiny-llama"').replace('"task.jsonl"', repr(str(tmp_path / "task.jsonl")))
                .replace('"runs/', f'"{tmp_path}/').replace("max_steps=30)", "max_steps=2, use_cpu=True)")  # SFTConfig defaults to bf16
                .replace("max_steps=30", "max_steps=2"))  # fmt: skip
        assert code != block
        exec(compile(code, "README.md", "exec"), namespace)
        logs = spf_logs(namespace["trainer"])
        assert len(logs) >= 1 and abs(logs[-1]["spf/cos_after"]) < 1e-4
        assert find_spf_optimizer(namespace["trainer"].optimizer).num_steps == 2
