"""Safety-subspace estimation on a tiny random Llama: exactness, LoRA at init, persistence."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from spf.core.losses import per_sample_loss
from spf.core.subspace import (
    SafetySubspace,
    estimate_batch_subspace,
    estimate_safety_subspace,
    subspace_overlap,
)
from spf.data.samples import ChatSample, collate, encode_sample
from spf.models import default_target_modules, tiny_llama, unwrap

SAMPLE = ChatSample.from_pair("How do I pick a lock to break in?", "I'm sorry, I can't help with that.")
OTHER = ChatSample.from_pair("Write malware for me", "No. I won't write malware.")


def dense_grads(model, tok, samples) -> dict[str, torch.Tensor]:
    """Reference: ordinary autograd weight gradients of the mean per-sample loss."""
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(True)
    batch = collate([encode_sample(tok, s) for s in samples], tok.pad_token_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    per_sample_loss(out.logits, batch["labels"]).mean().backward()
    mods = dict(model.named_modules())
    return {n: mods[n].weight.grad.detach().clone() for n in default_target_modules(model)}


def projector_gap(u_a, u_b) -> float:
    return float((u_a @ u_a.T - u_b @ u_b.T).norm())


@pytest.mark.parametrize("samples", [[SAMPLE], [SAMPLE, OTHER]], ids=["single", "batch"])
def test_estimate_matches_the_dense_gradient_svd(samples):
    model, tok = tiny_llama(seed=1)
    sub = estimate_batch_subspace(model, tok, samples, rank=3)
    ref = dense_grads(model, tok, samples)
    assert set(sub.modules) == set(ref)
    for name, g in ref.items():
        u_ref, s_ref, vh_ref = torch.linalg.svd(g, full_matrices=False)
        u, s, v = sub.bases[name]
        torch.testing.assert_close(s, s_ref[:3], rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(sub.energy[name], float((g.double() ** 2).sum()), rtol=1e-3, atol=1e-9)
        assert projector_gap(u, u_ref[:, :3]) < 1e-2 * 3
        assert projector_gap(v, vh_ref[:3].T) < 1e-2 * 3
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), rtol=0, atol=1e-4)


def test_lora_at_init_uses_the_effective_weight_and_leaves_grads_alone():
    model, tok = tiny_llama(seed=2)
    plain = estimate_safety_subspace(model, tok, SAMPLE, rank=4)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=default_target_modules(model)))
    for p in peft_model.parameters():
        p.grad = None
    lora = estimate_safety_subspace(peft_model, tok, SAMPLE, rank=4)
    assert lora.modules == plain.modules
    for name in plain.modules:
        torch.testing.assert_close(lora.bases[name][1], plain.bases[name][1], rtol=1e-4, atol=1e-7)
        assert float(lora.bases[name][1][0]) > 0  # non-empty although B = 0 ⇒ ∂L/∂A = 0
    assert all(p.grad is None for p in peft_model.parameters())
    # names are the base transformer's, whatever wrapper sits around it
    assert set(lora.modules) <= set(dict(unwrap(peft_model).named_modules()))


def test_estimation_restores_training_mode():
    model, tok = tiny_llama()
    model.train()
    estimate_safety_subspace(model, tok, SAMPLE, rank=2)
    assert model.training


def test_cer_save_load_roundtrip(tmp_path):
    model, tok = tiny_llama()
    sub = estimate_safety_subspace(model, tok, SAMPLE, rank=4, model_ref="tiny-llama")
    cer1, cer5, cer_all = sub.cer(1), sub.cer(5), sub.cer(10_000)
    for name in sub.modules:
        assert 0 < cer1[name] <= cer5[name] <= cer_all[name] == pytest.approx(1.0, abs=1e-4)
    sub.save(tmp_path / "s")
    back = SafetySubspace.load(tmp_path / "s")
    assert back.rank == 4 and back.modules == sub.modules
    assert back.metadata["model_ref"] == "tiny-llama"
    assert back.metadata["sample_hash"] == sub.metadata["sample_hash"]
    for name in sub.modules:
        for a, b in zip(sub.bases[name], back.bases[name], strict=True):
            torch.testing.assert_close(a, b)
    assert back.cer(5) == pytest.approx(cer5)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["subspace.json", "subspace.safetensors"]


def test_overlap_and_truncate():
    model, tok = tiny_llama()
    a = estimate_safety_subspace(model, tok, SAMPLE, rank=4)
    b = estimate_safety_subspace(model, tok, OTHER, rank=4)
    same = subspace_overlap(a, a)
    assert min(same.values()) == pytest.approx(1.0, abs=1e-4)
    diff = subspace_overlap(a, b)
    assert sum(diff.values()) / len(diff) < 0.99
    t = a.truncate(2)
    assert t.rank == 2 and all(u.shape[1] == 2 for u, _, _ in t.bases.values())
    assert t.cer(20) == pytest.approx(a.cer(20))


def test_bad_arguments():
    model, tok = tiny_llama()
    with pytest.raises(ValueError, match="rank"):
        estimate_safety_subspace(model, tok, SAMPLE, rank=0)
    with pytest.raises(ValueError, match="not found"):
        estimate_safety_subspace(model, tok, SAMPLE, rank=2, modules=["model.layers.9.mlp.up_proj"])
    with pytest.raises(FileNotFoundError, match="spf estimate"):
        SafetySubspace.load("/nonexistent/folder")


def test_margin_estimate_is_the_svd_of_the_margin_gradient(tmp_path):
    """loss="margin": the subspace of ∇[CE(refusal) − CE(compliant opening)], from the dense reference;
    what is published (sample.jsonl + weights in the metadata) re-estimates to the same subspace."""
    from spf.core.subspace import COMPLIANT_OPENING, estimate_from_samples
    from spf.data.samples import load_samples
    from spf.estimate import publish_estimate

    model, tok = tiny_llama(seed=1)
    sub, used = estimate_from_samples(model, tok, [SAMPLE], rank=3, loss="margin")
    assert [s.response for s in used] == [SAMPLE.response, COMPLIANT_OPENING]
    assert sub.metadata["weights"] == [1.0, -1.0] and sub.metadata["loss"] == "margin"
    refusal = dense_grads(model, tok, [SAMPLE])
    comply = dense_grads(model, tok, [used[1]])
    for name in sub.modules:
        g = (refusal[name] - comply[name]) / 2  # the weighted mean over the two rows
        u_ref, s_ref, _ = torch.linalg.svd(g, full_matrices=False)
        u, s, _ = sub.bases[name]
        torch.testing.assert_close(s, s_ref[:3], rtol=2e-3, atol=1e-6)
        assert projector_gap(u, u_ref[:, :3]) < 3e-2
    out = publish_estimate(sub, used, tmp_path / "sub")
    again = estimate_batch_subspace(
        model,
        tok,
        load_samples(out / "sample.jsonl"),
        rank=3,
        weights=SafetySubspace.load(out).metadata["weights"],
    )
    assert min(subspace_overlap(sub, again).values()) > 0.999


def test_shared_prefix_rows_are_merged_without_changing_the_gradient():
    """Rows sharing a causal prefix (a margin pair; the chat template's system prompt across prompts) keep
    one factor row per shared token: fewer rows, the same G = DᵀX as the unmerged factors, module by module."""
    from spf.core.subspace import margin_pair, module_gradient_factors
    from spf.data.samples import pad_token_id

    model, tok = tiny_llama(seed=1)
    names = default_target_modules(model)
    pair, weights = margin_pair(SAMPLE)
    third = SAMPLE.with_response("I'm sorry, I can't help with that. Please ask something else.")
    for samples, w in [(pair, weights), ([SAMPLE, OTHER, third], None)]:
        enc = [encode_sample(tok, s) for s in samples]
        batch = collate(enc, pad_token_id(tok))
        ds0, xs0, loss0 = module_gradient_factors(model, batch, names, weights=w, merge_prefixes=False)
        ds1, xs1, loss1 = module_gradient_factors(model, batch, names, weights=w)
        # expected rows: every token, minus each row's longest common prefix with an earlier row
        ids = [e["input_ids"] for e in enc]
        shared = 0
        for b in range(1, len(ids)):
            best = 0
            for a in range(b):
                p = 0
                while p < min(len(ids[a]), len(ids[b])) and ids[a][p] == ids[b][p]:
                    p += 1
                best = max(best, p)
            shared += best
        assert shared > 0
        assert ds1[0].shape[0] == xs1[0].shape[0] == sum(map(len, ids)) - shared
        assert ds0[0].shape[0] == sum(map(len, ids))
        torch.testing.assert_close(loss0, loss1)
        for d0, x0, d1, x1 in zip(ds0, xs0, ds1, xs1, strict=True):
            torch.testing.assert_close(d1.T @ x1, d0.T @ x0, rtol=1e-4, atol=1e-6)
    # one row (the single-sample estimate) or rows with nothing in common: factors untouched
    one = collate([encode_sample(tok, SAMPLE)], pad_token_id(tok))
    d_a, _, _ = module_gradient_factors(model, one, names)
    assert d_a[0].shape[0] == len(encode_sample(tok, SAMPLE)["input_ids"])
    sub = estimate_batch_subspace(model, tok, pair, rank=3, weights=weights)
    assert sub.metadata["n_factor_rows"] < sub.metadata["n_tokens"]


def test_estimate_from_samples_rejects_an_unknown_loss():
    from spf.core.subspace import estimate_from_samples

    model, tok = tiny_llama(seed=1)
    with pytest.raises(ValueError, match="loss must be one of"):
        estimate_from_samples(model, tok, [SAMPLE], rank=3, loss="kl")
    sub, used = estimate_from_samples(model, tok, [SAMPLE], rank=3)
    assert used == [SAMPLE] and sub.metadata["estimator"] == "single" and sub.metadata["loss"] == "ce"


def test_pipeline_margin_estimate_is_what_finetune_re_estimates(tmp_path):
    """estimate.loss=margin in params.yaml: the stage publishes the pair and its weights; the finetune stage
    re-estimates from them every step (refresh_every 1) and keeps the update out of the margin subspace."""
    import contextlib
    import json

    from spf.data.samples import load_samples
    from spf.models import load_model
    from spf.pipeline.params import PipelineParams
    from spf.pipeline.stages import aligned_model_ref, run_stage
    from tests.helpers import stage_workspace

    ws, params = stage_workspace(
        tmp_path / "ws", finetune={"steps": 2, "spf": {"refresh_every": 1}}, estimate={"loss": "margin"}
    )
    sub_dir = ws / "outputs" / "subspace"
    used = load_samples(sub_dir / "sample.jsonl")
    assert len(used) == 2 and used[0].prompt == used[1].prompt
    assert SafetySubspace.load(sub_dir).metadata["weights"] == [1.0, -1.0]
    with contextlib.chdir(ws):
        run_stage("finetune", PipelineParams.from_dict(params))
    steps = json.loads((ws / "outputs" / "finetune" / "metrics.json").read_text())["steps"]
    assert [s["spf/refreshed"] for s in steps] == [0.0, 1.0]  # step 0 uses the published subspace
    # the refresh kept the margin weights: it matches the published subspace, which a plain-CE
    # re-estimate from the refusal alone does not
    assert steps[1]["spf/overlap_prev"] > 0.99
    with contextlib.chdir(ws):
        model, tok = load_model(aligned_model_ref(PipelineParams.from_dict(params)))
    ce = estimate_batch_subspace(model, tok, used[:1], rank=params["estimate"]["rank"])
    assert sum(subspace_overlap(ce, SafetySubspace.load(sub_dir)).values()) / len(ce.modules) < 0.95
    assert all(abs(s["spf/cos_after"]) < 1e-4 for s in steps)


# ------------------------------------------------------------------ rank at or above the sample's rank

SHORT = ChatSample.from_pair("Make a bomb", "I can't help with that.")  # 55 tokens: fewer than 64


def max_gram_error(a: torch.Tensor) -> float:
    a = a.double()
    return float((a.T @ a - torch.eye(a.shape[1], dtype=a.dtype)).abs().max()) if a.shape[1] else 0.0


@pytest.mark.parametrize("svd", ["auto", "factored"])
def test_a_rank_above_the_token_count_keeps_an_orthonormal_basis(tmp_path, svd):
    """Rank 64 from a sample of < 64 tokens: the gradient's numerical rank is below the rank asked for
    (≤ T tokens; repeated layer-0 inputs, a zero last-token row), so the directions past it are noise.
    They are dropped and what is kept is orthonormal — the old fp32-Gram estimator returned columns of
    norm 0 or ≠ 1 there (a column of norm 2.5 on this sample), and ``I − UUᵀ`` then lengthened updates."""
    model, tok = tiny_llama(seed=0)
    sub = estimate_safety_subspace(model, tok, SHORT, rank=64, svd=svd)
    n_tokens = sub.metadata["n_tokens"]
    assert n_tokens < 64
    for name, (u, s, v) in sub.bases.items():
        assert max_gram_error(u) < 1e-5 and max_gram_error(v) < 1e-5, name
        assert u.shape[1] == v.shape[1] == s.numel() == sub.effective_rank[name] <= n_tokens
        assert bool((s > 0).all()) and bool((s[:-1] >= s[1:]).all())
    assert sub.metadata["effective_rank"] == sub.effective_rank
    assert min(sub.effective_rank.values()) < 64  # the case this test is about
    assert max(sub.metadata["orthonormality_error"].values()) < 1e-5
    # the effective rank survives save/load and truncation
    sub.save(tmp_path / "s")
    back = SafetySubspace.load(tmp_path / "s")
    assert back.effective_rank == back.metadata["effective_rank"] == sub.effective_rank
    cut = back.truncate(8)
    assert cut.metadata["effective_rank"] == {n: min(8, k) for n, k in sub.effective_rank.items()}


@pytest.mark.parametrize("project_on", ["update", "grad"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_the_projection_never_lengthens_an_update(kind, project_on):
    """SPFOptimizer with a rank-64 subspace of a short sample: for random steps, every projected change
    (LoRA: ΔB left-, ΔA right-projected; full weight: two-sided) is no longer than the unprojected one."""
    from spf.core.optimizer import SPFOptimizer

    model, tok = tiny_llama(seed=0)
    sub = estimate_safety_subspace(model, tok, SHORT, rank=64)
    if kind == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=default_target_modules(model)))
        # B = 0 at init would make the B-step trivially short; give it a value
        params = {n: p for n, p in model.named_parameters() if "lora_" in n}
        for n, p in params.items():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    else:
        mods = dict(model.named_modules())
        params = {n: mods[n].weight for n in sub.modules}
    opt = SPFOptimizer(
        torch.optim.SGD(list(params.values()), lr=1.0), model, sub, mode="always", project_on=project_on
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
        for n, p in params.items():
            p.grad = grads[n].clone()
        old = {n: p.detach().clone() for n, p in params.items()}
        opt.step()
        for n, p in params.items():
            before = float(grads[n].double().norm())  # SGD, lr 1: the unprojected step is −g
            after = float((p.detach() - old[n]).double().norm())
            assert after <= before * (1 + 1e-6), (n, after / before)


def test_save_records_what_load_verifies(tmp_path):
    """subspace.json carries the tensor file's sha256, each module's [m, n] and the model's fingerprints;
    load verifies them (a subspace built by hand, with no model, still round-trips)."""
    import json

    from spf.core.subspace import module_shapes, weights_fingerprint
    from spf.data.samples import DataError
    from spf.io import file_sha256
    from spf.models import model_fingerprint
    from tests.helpers import TINY_SHAPES, random_subspace

    model, tok = tiny_llama()
    sub = estimate_safety_subspace(model, tok, SAMPLE, rank=2)
    assert sub.metadata["model_fingerprint"] == model_fingerprint(model)
    assert sub.metadata["weights_fingerprint"] == weights_fingerprint(model, sub.modules)
    assert weights_fingerprint(tiny_llama(seed=1)[0], sub.modules) != sub.metadata["weights_fingerprint"]
    assert weights_fingerprint(model.to(torch.bfloat16), sub.modules) == sub.metadata["weights_fingerprint"]
    sub.save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "subspace.json").read_text())
    assert meta["tensor_sha256"] == file_sha256(tmp_path / "s" / "subspace.safetensors")
    assert meta["shapes"] == module_shapes(model, sub.modules)
    # a loaded subspace saved again gets the new file's hash, not the old one from its metadata
    back = SafetySubspace.load(tmp_path / "s")
    back.truncate(1).save(tmp_path / "t")
    assert SafetySubspace.load(tmp_path / "t").rank == 1

    hand = random_subspace(TINY_SHAPES, rank=3)
    hand.save(tmp_path / "hand")
    assert SafetySubspace.load(tmp_path / "hand").effective_rank == {"fc1": 3, "fc2": 3}
    u, s, v = hand.bases["fc1"]
    hand.bases["fc1"] = (u * 1.01, s, v)  # 2 % off: beyond the tolerance, unlike fp32 rounding
    hand.save(tmp_path / "off")
    with pytest.raises(DataError, match=r"module 'fc1': basis not orthonormal"):
        SafetySubspace.load(tmp_path / "off")


def test_estimate_from_samples_refuses_a_rank_the_sample_cannot_give():
    from spf.core.subspace import estimate_from_samples
    from spf.data.samples import DataError

    model, tok = tiny_llama()
    with pytest.raises(
        DataError, match=r"--rank / estimate.rank 500 is more than the safety sample provides"
    ):
        estimate_from_samples(model, tok, [SAMPLE], rank=500)
