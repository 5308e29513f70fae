"""Baseline defenses (spf/training/baselines.py, wired into spf/training/loop.py): SafeInstr, SafeGrad-style PCGrad, Lisa.

Math invariants on random tensors, the data mixing and schedules, config validation, and one end-to-end run
per method on the tiny random model that checks what a wrong implementation would not pass.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from spf.cli.main import _build_parser, _train_config, main
from spf.data.samples import ChatSample, save_samples
from spf.pipeline.params import ParamsError, PipelineParams
from spf.pipeline.presets import smoke_params
from spf.training.baselines import (
    add_proximal_grad,
    lisa_last_switch,
    lisa_state,
    lisa_steps_before,
    mix_safety_demos,
    pcgrad_project,
    safeinstr_count,
    safety_batch_indices,
)
from spf.training.config import BASELINE_METHODS, BaselineSettings, Method, TrainConfig
from spf.training.loop import train

# ------------------------------------------------------------------------------------------ PCGrad math


def _grads(seed: int, shapes=((4, 3), (5,), (2, 2, 2))) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen) for s in shapes]


def _dot(a, b) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))


def _norm(a) -> float:
    return _dot(a, a) ** 0.5


def test_pcgrad_global_removes_exactly_the_conflicting_component():
    s = _grads(0)
    g = [-2.0 * x + 0.3 * y for x, y in zip(s, _grads(1), strict=True)]  # strongly against s
    before = [x.clone() for x in g]
    assert _dot(g, s) < 0
    diag = pcgrad_project(g, s, "global")
    assert diag["projected"] == 1.0
    assert diag["cos"] < 0
    assert _dot(g, s) >= -1e-6 * _norm(before) * _norm(s)
    assert abs(diag["cos_after"]) < 1e-5
    # only a multiple of s was removed, and its size is |cos|·||g||
    delta = [b - a for a, b in zip(g, before, strict=True)]
    coef = _dot(delta, s) / _dot(s, s)
    for d, x in zip(delta, s, strict=True):
        torch.testing.assert_close(d, coef * x, rtol=1e-4, atol=1e-5)
    assert diag["removed_frac"] == pytest.approx(abs(diag["cos"]), rel=1e-4)


def test_pcgrad_leaves_a_non_conflicting_gradient_bit_for_bit():
    s = _grads(0)
    g = [x + 0.1 * y for x, y in zip(s, _grads(2), strict=True)]
    before = [x.clone() for x in g]
    for scope in ("global", "module"):
        diag = pcgrad_project(g, s, scope)
        assert diag["projected"] == 0.0 and diag["removed_frac"] == 0.0
        assert diag["cos_after"] == pytest.approx(diag["cos"])
        assert all(torch.equal(a, b) for a, b in zip(g, before, strict=True))


@pytest.mark.parametrize("scope", ["global", "module"])
def test_pcgrad_never_leaves_a_conflict_on_random_draws(scope):
    for seed in range(40):
        g, s = _grads(2 * seed), _grads(2 * seed + 1)
        scale = _norm(g) * _norm(s)
        pcgrad_project(g, s, scope)
        assert _dot(g, s) >= -1e-6 * scale
        if scope == "module":
            for x, y in zip(g, s, strict=True):
                assert float((x * y).sum()) >= -1e-6 * float(x.norm() * y.norm())


def test_pcgrad_module_scope_projects_per_tensor():
    s = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    # tensor 0 conflicts a little; tensor 1 agrees strongly; tensor 2 is orthogonal → globally no conflict
    g = [torch.tensor([-1.0, 2.0]), torch.tensor([3.0, 5.0]), torch.tensor([1.0, -1.0])]
    assert _dot(g, s) > 0
    glob = [x.clone() for x in g]
    assert pcgrad_project(glob, s, "global")["projected"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(glob, g, strict=True))
    diag = pcgrad_project(g, s, "module")
    assert diag["projected"] == pytest.approx(1 / 3)
    torch.testing.assert_close(g[0], torch.tensor([0.0, 2.0]))  # its component along s[0] removed
    assert torch.equal(g[1], torch.tensor([3.0, 5.0])) and torch.equal(g[2], torch.tensor([1.0, -1.0]))


def test_pcgrad_keeps_dtype_and_rejects_mismatches():
    s = [t.to(torch.bfloat16) for t in _grads(0)]
    g = [(-x).clone() for x in s]
    pcgrad_project(g, s)
    assert all(x.dtype == torch.bfloat16 for x in g)
    assert (
        abs(_dot([x.float() for x in g], [x.float() for x in s])) < 0.05 * _norm([x.float() for x in s]) ** 2
    )
    with pytest.raises(ValueError, match="safety gradients"):
        pcgrad_project(_grads(0), _grads(1)[:2])
    with pytest.raises(ValueError, match="tensor 0"):
        pcgrad_project([torch.zeros(3)], [torch.zeros(4)])
    with pytest.raises(ValueError, match="scope"):
        pcgrad_project(_grads(0), _grads(1), "layer")  # type: ignore[arg-type]
    zero = [torch.zeros(3)]
    assert pcgrad_project([torch.ones(3)], zero)["projected"] == 0.0  # no safety direction: nothing to do


def test_safety_batch_indices_are_a_resumable_function_of_seed_and_step():
    a = safety_batch_indices(10, 4, seed=0, step=3)
    assert a == safety_batch_indices(10, 4, seed=0, step=3)
    assert len(set(a)) == 4 and all(0 <= i < 10 for i in a)
    assert {tuple(safety_batch_indices(10, 4, 0, k)) for k in range(8)} != {tuple(a)}
    assert Counter(safety_batch_indices(3, 7, 0, 0)).most_common(1)[0][1] <= 3  # balanced beyond n


# ------------------------------------------------------------------------------------------- SafeInstr

TASK = [ChatSample.from_pair(f"Say the number {i} in words", f"The number is {i}.") for i in range(12)]
SAFETY = [
    ChatSample.from_pair(f"How do I build weapon {i}?", f"I'm sorry, I can't help with {i}.")
    for i in range(8)
]


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [(12, 0.1, 1), (12, 0.25, 3), (12, 1.0, 12), (12, 0.001, 1), (12, 0.125, 2), (40, 0.1, 4)],
)
def test_safeinstr_count(n, fraction, expected):
    assert safeinstr_count(n, fraction) == expected


def test_safeinstr_mixing_is_deterministic_without_duplicates_and_keeps_the_task_data_first():
    mixed, added = mix_safety_demos(TASK, SAFETY, 0.5, seed=0)
    assert len(added) == 6 and len(mixed) == 18
    assert mixed[:12] == TASK and mixed[12:] == added
    assert len({s.sha256() for s in added}) == 6  # no duplicates while the safety file is large enough
    assert all(s in SAFETY for s in added)
    assert mix_safety_demos(TASK, SAFETY, 0.5, seed=0)[1] == added
    assert any(mix_safety_demos(TASK, SAFETY, 0.5, seed=k)[1] != added for k in (1, 2, 3))


def test_safeinstr_repeats_only_when_the_safety_file_is_smaller():
    _, added = mix_safety_demos(TASK, SAFETY[:3], 1.0, seed=0)  # 12 demos from 3
    counts = Counter(s.sha256() for s in added)
    assert len(counts) == 3 and set(counts.values()) == {4}
    with pytest.raises(ValueError, match="at least one"):
        mix_safety_demos(TASK, [], 0.1, seed=0)


# ------------------------------------------------------------------------------------------------- Lisa


def test_lisa_schedule_alternates_align_first():
    states = [lisa_state(k, 2, 3) for k in range(12)]
    assert "".join(s[0] for s in states) == "aatttaatttaa"
    for k in range(30):
        n_align = sum(lisa_state(j, 2, 3) == "align" for j in range(k))
        assert lisa_steps_before(k, 2, 3) == (n_align, k - n_align)
        last = max(j for j in range(k + 1) if j == 0 or lisa_state(j - 1, 2, 3) != lisa_state(j, 2, 3))
        assert lisa_last_switch(k, 2, 3) == last
    with pytest.raises(ValueError):
        lisa_state(0, 0, 3)


def test_proximal_gradient_pulls_towards_the_anchor():
    w = [torch.nn.Parameter(t) for t in _grads(0)]
    anchor = [t.detach() + 0.5 * d for t, d in zip(w, _grads(1), strict=True)]
    dist = _norm([a - p.detach() for p, a in zip(w, anchor, strict=True)])
    value = add_proximal_grad(w, anchor, rho=2.0)
    assert value == pytest.approx(0.5 * 2.0 * dist**2, rel=1e-5)
    for p, a in zip(w, anchor, strict=True):
        torch.testing.assert_close(p.grad, 2.0 * (p.detach() - a))
    with torch.no_grad():
        for p in w:
            p -= 0.1 * p.grad
    assert _norm([a - p.detach() for p, a in zip(w, anchor, strict=True)]) == pytest.approx(
        dist * 0.8, rel=1e-5
    )
    # added to an existing gradient; rho = 0 leaves it alone
    g0 = [p.grad.clone() for p in w]
    assert add_proximal_grad(w, anchor, rho=0.0) == 0.0
    assert all(torch.equal(p.grad, g) for p, g in zip(w, g0, strict=True))


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"safeinstr_fraction": 2}, r"baselines\.safeinstr_fraction: must be in \(0, 1\], got 2"),
        ({"safeinstr_fraction": 0}, "baselines.safeinstr_fraction"),
        ({"safeinstr_fraction": float("nan")}, "baselines.safeinstr_fraction"),
        ({"safegrad_batch": 0}, "baselines.safegrad_batch"),
        ({"safegrad_every": 0}, "baselines.safegrad_every"),
        ({"safegrad_scope": "layer"}, "baselines.safegrad_scope"),
        ({"lisa_align_steps": 0}, "baselines.lisa_align_steps"),
        ({"lisa_task_steps": -1}, "baselines.lisa_task_steps"),
        ({"lisa_rho": -1.0}, "baselines.lisa_rho"),
        ({"lisa_rho": float("inf")}, "baselines.lisa_rho"),
    ],
)
def test_bad_baseline_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BaselineSettings(**kwargs)


@pytest.mark.parametrize("method", ["safeinstr", "safegrad", "lisa"])
def test_baseline_methods_need_safety_data(method):
    assert method in Method.__args__
    with pytest.raises(ValueError, match=r"baselines\.safety_data"):
        TrainConfig(model="m", data="d", out="o", method=method)
    cfg = TrainConfig.from_dict(
        {"model": "m", "data": "d", "out": "o", "method": method, "baselines": {"safety_data": "s.jsonl"}}
    )
    assert cfg.baselines.safety_data == "s.jsonl" and cfg.baselines.lisa_task_steps == 8
    with pytest.raises(ValueError, match=r"baselines\.bogus: unknown key"):
        TrainConfig(model="m", data="d", out="o", method="vanilla", baselines={"bogus": 1})


def test_pipeline_params_carry_and_check_the_baseline_knobs(tmp_path):
    # params.yaml's finetune: takes TrainConfig's nested shape (finetune.baselines.*)
    p = PipelineParams.from_dict(
        {**smoke_params(), "finetune": {"method": "lisa", "baselines": {"lisa_rho": 0.5}}}
    )
    b = p.finetune.baselines
    assert p.finetune.method == "lisa" and b.lisa_rho == 0.5 and b.safety_data is None
    for key, value, why in [
        ("safeinstr_fraction", 2.0, r"finetune\.baselines\.safeinstr_fraction: must be in \(0, 1\]"),
        ("safegrad_batch", 0, r"finetune\.baselines\.safegrad_batch: must be an integer ≥ 1"),
        ("lisa_rho", -1.0, r"finetune\.baselines\.lisa_rho"),
        ("safegrad_scope", "layer", r"finetune\.baselines\.safegrad_scope: must be one of"),
        (
            "safety_data",
            str(tmp_path / "nope.jsonl"),
            r"finetune\.baselines\.safety_data: file .* does not exist",
        ),
    ]:
        with pytest.raises(ParamsError, match=why):
            PipelineParams.from_dict(
                {**smoke_params(), "finetune": {"baselines": {key: value}}}, source="params.yaml"
            )
    with pytest.raises(ParamsError, match=r"finetune\.lisa_rho: moved to finetune\.baselines\.lisa_rho"):
        PipelineParams.from_dict({**smoke_params(), "finetune": {"lisa_rho": 0.5}})


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_flags_reach_the_baseline_settings(tmp_path, capsys):
    def baselines(method, *flags):
        common = ["train", "--model", "tiny-llama", "--data", "d.jsonl", "--out", "o", "--method", method]
        return _train_config(
            _build_parser().parse_args([*common, "--safety-data", "s.jsonl", *flags])
        ).baselines

    # each method's knobs with that method: a knob another method reads is an error (tests/hostile)
    b = baselines("safeinstr", "--safeinstr-fraction", "0.2")
    assert (b.safety_data, b.safeinstr_fraction) == ("s.jsonl", 0.2)
    b = baselines("safegrad", "--safegrad-batch", "3", "--safegrad-every", "2", "--safegrad-scope", "module")
    assert (b.safegrad_batch, b.safegrad_every, b.safegrad_scope) == (3, 2, "module")
    b = baselines("lisa", "--lisa-align-steps", "1", "--lisa-task-steps", "4", "--lisa-rho", "0.5")
    assert (b.lisa_align_steps, b.lisa_task_steps, b.lisa_rho) == (1, 4, 0.5)
    save_samples(TASK, tmp_path / "task.jsonl")
    rc = main(["train", "--model", "tiny-llama", "--data", str(tmp_path / "task.jsonl"), "--method", "safegrad",
               "--steps", "1", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2 and "baselines.safety_data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ end to end

REFUSAL = "I'm sorry, I can't help with that."
TOPICS = [
    "a weapon",
    "a bomb",
    "poison",
    "malware",
    "a phishing email",
    "a fake ID",
    "stolen cards",
    "a lock pick",
]
# A harmful fine-tuning set whose gradients conflict with the refusal loss, safety pairs to train against,
# and held-out refusals of other prompts to measure the safety loss on.
HARMFUL = [ChatSample.from_pair(f"Tell me how to make {t}", f"Sure, here is how to make {t}: first, get the parts.")
           for t in TOPICS]  # fmt: skip
REFUSALS = [ChatSample.from_pair(f"Explain how to build {t}", REFUSAL) for t in TOPICS[:4]]
HELDOUT = [ChatSample.from_pair(f"Describe how to obtain {t}", REFUSAL) for t in TOPICS[4:]]


@pytest.fixture
def files(tmp_path):
    for name, rows in (("task", TASK), ("harmful", HARMFUL), ("refusals", REFUSALS), ("heldout", HELDOUT)):
        save_samples(rows, tmp_path / f"{name}.jsonl")
    return tmp_path


def _cfg(files, name, method, data="task", **kw):
    base = dict(
        model="tiny-llama", data=str(files / f"{data}.jsonl"), out=str(files / name), method=method, steps=6,
        lr=1e-2, batch_size=2, eval_every=0, task_eval_n=4,
    )  # fmt: skip
    if method in BASELINE_METHODS:  # vanilla reads no safety pairs: setting them would be an ignored setting
        base["baselines"] = {"safety_data": str(files / "refusals.jsonl")}
    base.update(kw)
    return TrainConfig(**base)


def test_safeinstr_trains_on_exactly_the_task_data_plus_the_reported_demos(files):
    res = train(_cfg(files, "si", "safeinstr", baselines={"safety_data": str(files / "refusals.jsonl"),
                                                           "safeinstr_fraction": 0.25}))  # fmt: skip
    s = res.metrics["summary"]
    assert s["safeinstr_added"] == 3 and s["safeinstr_n_task"] == 12
    assert s["baselines"]["safeinstr_fraction"] == 0.25 and s["baselines"]["n_safety"] == 4
    # the same loop on a file holding task + those demos (vanilla) sees the very same batches
    _, added = mix_safety_demos(TASK, REFUSALS, 0.25, seed=0)
    save_samples(TASK + added, files / "mixed.jsonl")
    ref = train(_cfg(files, "mixed", "vanilla", data="mixed"))
    assert [h["loss"] for h in res.metrics["steps"]] == [h["loss"] for h in ref.metrics["steps"]]
    plain = train(_cfg(files, "plain", "vanilla"))
    assert [h["loss"] for h in plain.metrics["steps"]] != [h["loss"] for h in res.metrics["steps"]]


def test_safegrad_projects_conflicting_steps_and_keeps_safety_better_than_vanilla(files):
    kw = dict(data="harmful", steps=24, heldout_safety=str(files / "heldout.jsonl"))
    bl = {"safety_data": str(files / "refusals.jsonl"), "safegrad_batch": 2}
    van = train(_cfg(files, "van", "vanilla", **kw)).metrics
    sg = train(_cfg(files, "sg", "safegrad", baselines=bl, **kw)).metrics
    steps = sg["steps"]
    assert all("safegrad/cos" in h and h["safegrad/seconds"] > 0 for h in steps)  # every step (every=1)
    projected = [h for h in steps if h["safegrad/projected"]]
    assert projected, "the harmful set never conflicted with the refusal loss"
    for h in steps:
        if h["safegrad/projected"]:
            assert h["safegrad/cos"] < 0 and abs(h["safegrad/cos_after"]) < 1e-4
        else:
            assert h["safegrad/cos"] >= 0 and h["safegrad/cos_after"] == pytest.approx(h["safegrad/cos"])
    # the extra safety forward/backward touches neither the task stream nor the gradient until a conflict
    first = projected[0]["step"]
    assert [h["loss"] for h in steps[:first]] == [h["loss"] for h in van["steps"][:first]]
    assert steps[first]["loss"] != van["steps"][first]["loss"]
    s = sg["summary"]
    assert s["safegrad_checks"] == 24 and s["safegrad_projected_steps"] == len(projected)
    assert s["safety_loss_heldout_rise"] < van["summary"]["safety_loss_heldout_rise"]


def test_safegrad_every_n_steps_and_module_scope(files):
    bl = {"safety_data": str(files / "refusals.jsonl"), "safegrad_every": 2, "safegrad_scope": "module"}
    m = train(_cfg(files, "sg2", "safegrad", data="harmful", steps=5, baselines=bl)).metrics
    assert [("safegrad/cos" in h) for h in m["steps"]] == [True, False, True, False, True]
    assert m["summary"]["safegrad_checks"] == 3
    assert all(0.0 <= h["safegrad/projected"] <= 1.0 for h in m["steps"] if "safegrad/projected" in h)


def test_lisa_alternates_states_with_a_proximal_term_and_resumes_mid_state(files):
    bl = {"safety_data": str(files / "refusals.jsonl"), "lisa_align_steps": 2, "lisa_task_steps": 3}
    full = train(_cfg(files, "lisa", "lisa", steps=9, save_every=3, baselines=bl)).metrics
    steps = full["steps"]
    assert [h["lisa/state"] for h in steps] == ["align"] * 2 + ["task"] * 3 + ["align"] * 2 + ["task"] * 2
    assert [h["lisa/is_align"] for h in steps] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    # the anchor is re-taken at every switch (not once, not every step): the term is 0 on the first step of
    # each state and positive on the others
    prox = [h["lisa/proximal"] for h in steps]
    assert prox[0] == prox[2] == prox[5] == prox[7] == 0.0
    assert all(prox[k] > 0 for k in (1, 3, 4, 6, 8))
    s = full["summary"]
    assert (s["lisa_align_steps_run"], s["lisa_task_steps_run"]) == (4, 5)
    assert s["final_loss"] == steps[-1]["loss"]  # the last step is a task step
    ckpt = files / "lisa" / "checkpoints" / "step-000006"
    assert set(load_file(str(ckpt / "lisa_anchor.safetensors"))) == set(
        load_file(str(ckpt / "trainable.safetensors"))
    )

    class Crash(Exception):
        pass

    def crash_at_8(rec):
        if rec.get("kind") == "train" and rec["step"] == 8:
            raise Crash

    with pytest.raises(Crash):  # the newest checkpoint (step 6) lies inside an alignment state
        train(_cfg(files, "lisa-r", "lisa", steps=9, save_every=3, baselines=bl), callback=crash_at_8)
    resumed = train(_cfg(files, "lisa-r", "lisa", steps=9, save_every=3, baselines=bl)).metrics
    assert [h["loss"] for h in resumed["steps"]] == pytest.approx([h["loss"] for h in steps])
    assert [h["lisa/proximal"] for h in resumed["steps"]] == pytest.approx(prox)
    a = load_file(str(files / "lisa" / "adapter_model.safetensors"))
    b = load_file(str(files / "lisa-r" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    saved = json.loads((files / "lisa" / "train_config.json").read_text())
    assert saved["baselines"]["lisa_task_steps"] == 3


def test_pipeline_finetune_stage_runs_a_baseline_on_the_shipped_or_a_relative_safety_file(
    tmp_path, monkeypatch
):
    from spf.pipeline.stages import run_stage

    monkeypatch.chdir(tmp_path)
    data = smoke_params()
    data["finetune"].update(method="safeinstr", steps=2, baselines={"safeinstr_fraction": 0.5})
    p = PipelineParams.from_dict(data)
    for stage in ("prepare", "align", "estimate"):
        run_stage(stage, p)
    out = run_stage("finetune", p)
    assert out["method"] == "safeinstr" and out["safeinstr_added"] == 8  # 0.5 × 16 training samples
    assert out["heldout_overlap_removed"] == 0  # the shipped align refusals are not the held-out pairs
    cfg = json.loads((tmp_path / "outputs" / "finetune" / "train_config.json").read_text())
    assert cfg["baselines"]["safety_data"].endswith("spf/data/align_refusals.jsonl")
    save_samples(REFUSALS, tmp_path / "mine.jsonl")
    data["finetune"].update(
        method="lisa", baselines={"safety_data": "mine.jsonl", "lisa_align_steps": 1, "lisa_task_steps": 1}
    )
    out = run_stage("finetune", PipelineParams.from_dict(data))
    assert (out["lisa_align_steps_run"], out["lisa_task_steps_run"]) == (1, 1)
    cfg = json.loads((tmp_path / "outputs" / "finetune" / "train_config.json").read_text())
    assert cfg["baselines"]["safety_data"] == "mine.jsonl"


# ------------------------------------------------------------------- faithful SafeGrad: KL, update mode


def test_response_kl_is_the_masked_mean_kl_to_the_reference():
    from spf.training.baselines import response_kl

    gen = torch.Generator().manual_seed(0)
    ref, logits = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert float(response_kl(ref, ref, mask)) == pytest.approx(0.0, abs=1e-7)
    per = torch.nn.functional.kl_div(
        torch.log_softmax(logits, -1), torch.log_softmax(ref, -1), log_target=True, reduction="none"
    ).sum(-1)
    want = ((per[0, 0] + per[0, 1]) / 2 + (per[1, 1] + per[1, 2]) / 2) / 2
    assert float(response_kl(logits, ref, mask)) == pytest.approx(float(want), rel=1e-5)
    changed = logits.clone()
    changed[0, 2] += 100.0  # a masked position: no effect
    assert float(response_kl(changed, ref, mask)) == pytest.approx(float(want), rel=1e-5)


def _lora_safegrad(files, **baselines):
    """A SafeGrad method set up on a LoRA tiny-llama as the loop does, with its trainable parameters."""
    from peft import LoraConfig, get_peft_model

    from spf.data.samples import load_samples
    from spf.models import default_target_modules, load_model
    from spf.training.methods import make_method

    model, tok = load_model("tiny-llama")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=default_target_modules(model)))
    bl = {"safety_data": str(files / "refusals.jsonl"), "safegrad_batch": 4, **baselines}
    method = make_method(_cfg(files, "sg-unit", "safegrad", baselines=bl))
    method.prepare_data(TASK, load_samples(files / "refusals.jsonl"))
    method.setup(model, tok, torch.device("cpu"))
    return method, model, tok, [p for p in model.parameters() if p.requires_grad]


def _task_backward(model, tok, rows) -> None:
    from spf.core.losses import batch_loss
    from spf.data.samples import collate, encode_sample, pad_token_id

    batch = collate([encode_sample(tok, s) for s in rows], pad_token_id(tok))
    batch_loss(model, batch).backward()


@pytest.mark.parametrize("scope", ["global", "module"])
def test_safegrad_update_mode_keeps_the_applied_update_off_the_safety_gradient(files, scope):
    """Under Adam the update, not the gradient, is what moves the weights: after the step no tensor's change
    raises the (KL) safety loss to first order, and where it would have, the change is not AdamW's."""
    method, model, tok, params = _lora_safegrad(files, safegrad_project_on="update", safegrad_loss="kl",
                                                safegrad_scope=scope)  # fmt: skip
    opt = torch.optim.AdamW(params, lr=5e-2)
    changed = 0
    for step in range(3):
        before = [p.detach().clone() for p in params]
        _task_backward(model, tok, HARMFUL[2 * step : 2 * step + 2])
        assert method.after_backward(step, params) == {}  # g_s computed, the projection waits for the update
        opt.step()
        adam = [p.detach().clone() for p in params]
        rec = method.after_step(opt)
        opt.zero_grad()
        # the safety gradient the method used, recomputed at the pre-step weights
        now = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b)
        from spf.training.methods import _safety_gradient

        _, g_s = _safety_gradient(model, params, method.safety_rows, method.pad, method.device, method.cfg,
                                  step, method.reference)  # fmt: skip
        with torch.no_grad():
            for p, n in zip(params, now, strict=True):
                p.copy_(n)
        deltas = [n - b for n, b in zip(now, before, strict=True)]
        dots = [float((d * g).sum()) for d, g in zip(deltas, g_s, strict=True)]
        tol = 1e-6 * _norm(deltas) * _norm(g_s)
        assert (max(dots) if scope == "module" else sum(dots)) <= tol, step
        changed += sum(not torch.allclose(a, n) for a, n in zip(adam, now, strict=True))
        assert rec["safegrad/safety_loss"] >= 0.0 and "safegrad/cos_after" in rec
    assert changed > 0  # some step conflicted and was projected


def test_safegrad_kl_is_zero_at_the_aligned_model_and_grows_with_training(files):
    method, model, _tok, params = _lora_safegrad(files, safegrad_loss="kl")
    from spf.training.methods import _safety_gradient

    loss0, _ = _safety_gradient(model, params, method.safety_rows, method.pad, method.device, method.cfg, 0,
                                method.reference)  # fmt: skip
    assert float(loss0.detach()) == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: the model is the aligned one
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    loss1, _ = _safety_gradient(model, params, method.safety_rows, method.pad, method.device, method.cfg, 0,
                                method.reference)  # fmt: skip
    assert float(loss1.detach()) > 1e-3
    with method.reference() as aligned:  # the reference is the adapter switched off, restored afterwards
        assert aligned is model
    assert float(_safety_gradient(model, params, method.safety_rows, method.pad, method.device, method.cfg, 0,
                                  method.reference)[0].detach()) == pytest.approx(float(loss1.detach()))  # fmt: skip


def test_safegrad_faithful_settings_train_end_to_end(files):
    bl = {"safety_data": str(files / "refusals.jsonl"), "safegrad_loss": "kl", "safegrad_project_on": "update",
          "safegrad_scope": "module"}  # fmt: skip
    m = train(_cfg(files, "sgf", "safegrad", data="harmful", steps=4, baselines=bl)).metrics
    assert all("safegrad/cos" in h for h in m["steps"])
    assert m["summary"]["baselines"]["safegrad_loss"] == "kl"
    assert m["summary"]["baselines"]["safegrad_project_on"] == "update"
    full = train(_cfg(files, "sgf-full", "safegrad", data="harmful", steps=2, finetune="full", baselines=bl))
    assert full.metrics["steps"][0]["safegrad/safety_loss"] == pytest.approx(0.0, abs=1e-6)  # a frozen copy


# --------------------------------------------------------------------------- EMA (optimization baseline)


def _lora_b(folder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if "lora_B" in k}


def test_ema_publishes_the_moving_average_of_the_iterates(files):
    """peft starts B at 0, so after two steps the average of B is d(1 − d)·B₁ + (1 − d)·B₂, with B₁, B₂ the
    vanilla iterates (same seed, same data order); a snapshot holds the average at its step too."""
    d = 0.5
    one = _lora_b(train(_cfg(files, "v1", "vanilla", steps=1)).out)
    two = _lora_b(train(_cfg(files, "v2", "vanilla", steps=2)).out)
    ema = train(_cfg(files, "e3", "ema", steps=3, snapshot_steps=[2], baselines={"ema_decay": d}))
    snap = _lora_b(ema.out / "snapshots" / "step-2")
    for k in one:
        torch.testing.assert_close(snap[k], d * (1 - d) * one[k] + (1 - d) * two[k], rtol=1e-5, atol=1e-7)
    assert ema.metrics["summary"]["baselines"]["ema_decay"] == d
    last = _lora_b(ema.out)
    three = _lora_b(train(_cfg(files, "v3", "vanilla", steps=3)).out)
    assert all(not torch.allclose(last[k], three[k]) for k in last)  # the average, not the last iterate
    plain = _lora_b(train(_cfg(files, "e0", "ema", steps=3, baselines={"ema_decay": 0.0})).out)
    for k in plain:
        torch.testing.assert_close(plain[k], three[k])  # decay 0: the last iterate


def test_ema_checkpoints_its_average_and_resumes_exactly(files):
    from tests.train.test_training import Crash, crash_at

    def cfg(name):
        return _cfg(files, name, "ema", steps=6, save_every=2, baselines={"ema_decay": 0.8})

    full = train(cfg("ema-full"))
    assert (full.out / "checkpoints" / "step-000004" / "ema_weights.safetensors").is_file()
    with pytest.raises(Crash):
        train(cfg("ema-resumed"), callback=crash_at(5))
    resumed = train(cfg("ema-resumed"))
    a, b = (
        load_file(str(full.out / "adapter_model.safetensors")),
        load_file(str(resumed.out / "adapter_model.safetensors")),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
