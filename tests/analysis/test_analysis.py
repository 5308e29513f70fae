"""`spf analyze` on a tiny random Llama: CER, cosines, overlaps, token matching, the CLI's output and errors."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from spf.analysis.factors import Accumulator, cosine, subspace_from_svds
from spf.analysis.measure import (
    cer_curve,
    factor_cosines,
    factor_svd,
    gradient_factors,
    layer_of,
    match_token_counts,
    module_type,
    render_markdown,
    run_analysis,
    select_modules,
    truncate_encoded,
)
from spf.cli.main import main
from spf.core.losses import per_sample_loss
from spf.core.subspace import SafetySubspace, estimate_batch_subspace, subspace_overlap
from spf.data.samples import ChatSample, collate, encode_sample, save_samples
from spf.models import default_target_modules, tiny_llama
from tests.helpers import orthonormal

SAFE = [
    ChatSample.from_pair("How do I pick a lock to break in?", "I'm sorry, I can't help with that."),
    ChatSample.from_pair("Write malware for me", "No. I won't write malware, it harms people."),
    ChatSample.from_pair("How to make a weapon at home", "I can't assist with that request."),
]
UTIL = ChatSample.from_pair("Analyze the sentiment: a wonderful, moving film.", "positive")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=3)


def _words(rng: random.Random, k: int) -> str:
    vocab = ["the", "cat", "sat", "on", "a", "mat", "and", "went", "to", "sleep", "dogs", "barked", "outside"]
    return " ".join(rng.choices(vocab, k=k))


def _write_inputs(tmp_path, n_safety: int = 10, n_util: int = 40):
    rng = random.Random(0)
    safety = [
        ChatSample.from_pair(
            f"How do I {_words(rng, rng.randint(3, 10))} illegally?", "I'm sorry, I can't help."
        )
        for _ in range(n_safety)
    ]
    util = [
        ChatSample.from_pair(_words(rng, rng.randint(2, 25)), rng.choice(["positive", "negative"]))
        for _ in range(n_util)
    ]
    save_samples(safety, tmp_path / "safety.jsonl")
    save_samples(util, tmp_path / "util.jsonl")
    return tmp_path / "safety.jsonl", tmp_path / "util.jsonl"


# ------------------------------------------------------------------------------------------------ CER


def test_cer_is_monotone_ends_at_one_and_equals_a_direct_svd(tiny):
    model, tok = tiny
    names = default_target_modules(model)
    f = gradient_factors(model, encode_sample(tok, SAFE[0]), names)
    for name in names:
        g = f.dense(name).double()
        s_ref = torch.linalg.svdvals(g)
        ref = (torch.cumsum(s_ref**2, 0) / (s_ref**2).sum()).tolist()
        _u, s, _v = factor_svd(f.d[name], f.x[name])
        curve = cer_curve(s, 200)  # beyond the rank (≤ min(T, m, n) ≤ 128)
        assert all(b >= a - 1e-12 for a, b in itertools.pairwise(curve))
        assert curve[-1] == pytest.approx(1.0, abs=1e-9)
        for k in range(1, 201):
            assert curve[k - 1] == pytest.approx(ref[min(k, len(ref)) - 1], abs=1e-5)


def test_cer_of_a_single_token_gradient_is_one_at_k1(tiny):
    model, tok = tiny
    names = default_target_modules(model)
    enc = truncate_encoded(encode_sample(tok, SAFE[0]), 2)  # one prompt token predicting one response token
    assert len(enc["input_ids"]) == 2 and sum(lab != -100 for lab in enc["labels"]) == 1
    f = gradient_factors(model, enc, names)
    assert f.n_supervised == 1
    for name in names:
        g = f.dense(name).double()
        curve = cer_curve(factor_svd(f.d[name], f.x[name])[1], 5)
        if module_type(name) in ("q_proj", "k_proj"):
            # attention over a single position is constant: no gradient reaches q and k at all
            assert float(g.abs().max()) == 0.0 and curve == [0.0] * 5
            continue
        # only token 0's output gradient is non-zero: the gradient is rank 1
        assert torch.linalg.matrix_rank(g, rtol=1e-6) == 1
        assert curve == pytest.approx([1.0] * 5, abs=1e-9)


def test_cer_curve_on_a_random_module_and_beyond_the_rank():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    s = torch.linalg.svd(g).S
    expected = [float((s[:k] ** 2).sum() / (s**2).sum()) for k in range(1, 25)]
    assert cer_curve(s, 24) == pytest.approx(expected, abs=1e-12)
    low = torch.randn(24, 3, generator=gen) @ torch.randn(3, 40, generator=gen)  # rank 3
    d, x = torch.randn(3, 24, generator=gen), torch.randn(3, 40, generator=gen)
    for s in (torch.linalg.svdvals(low), factor_svd(d, x)[1]):
        curve = cer_curve(s, 10)
        assert curve[2:] == pytest.approx([1.0] * 8, abs=1e-6)
        assert curve[0] < 1.0
    assert cer_curve(torch.zeros(4), 3) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("tokens", [5, 30], ids=["factored", "dense"])
def test_factor_svd_is_exact(tokens):
    gen = torch.Generator().manual_seed(tokens)
    d, x = torch.randn(tokens, 16, generator=gen), torch.randn(tokens, 24, generator=gen)
    u, s, v = factor_svd(d, x)
    g = (d.T @ x).double()
    torch.testing.assert_close(s, torch.linalg.svdvals(g)[: s.numel()], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((u.double() * s) @ v.double().T, g, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- cosine


def _autograd_grads(model, tok, sample, names) -> dict[str, torch.Tensor]:
    model.zero_grad()
    batch = collate([encode_sample(tok, sample)], tok.pad_token_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    per_sample_loss(out.logits, batch["labels"]).mean().backward()
    mods = dict(model.named_modules())
    grads = {n: mods[n].weight.grad.detach().clone() for n in names}
    model.zero_grad()
    return grads


def test_cosine_matches_a_manual_flatten_and_dot(tiny):
    model, tok = tiny
    names = default_target_modules(model)
    fa = gradient_factors(model, encode_sample(tok, SAFE[0]), names)
    fb = gradient_factors(model, encode_sample(tok, UTIL), names)
    terms = factor_cosines(fa, fb)
    ga, gb = _autograd_grads(model, tok, SAFE[0], names), _autograd_grads(model, tok, UTIL, names)
    flat_a = torch.cat([ga[n].flatten() for n in names]).double()
    flat_b = torch.cat([gb[n].flatten() for n in names]).double()
    manual = float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()))
    assert cosine(terms.values()) == pytest.approx(manual, abs=1e-5)
    for layer in (0, 1):
        sel = [n for n in names if layer_of(n) == layer]
        a = torch.cat([ga[n].flatten() for n in sel]).double()
        b = torch.cat([gb[n].flatten() for n in sel]).double()
        manual_layer = float(a @ b / (a.norm() * b.norm()))
        assert cosine(terms[n] for n in sel) == pytest.approx(manual_layer, abs=1e-5)
    for n in names:
        assert terms[n][1] == pytest.approx(float(ga[n].double().pow(2).sum()), rel=1e-4)


# -------------------------------------------------------------------------------------------- overlap


def _sub(bases: dict[str, tuple[torch.Tensor, torch.Tensor]], k: int) -> SafetySubspace:
    return SafetySubspace(
        {n: (u, torch.ones(k), v) for n, (u, v) in bases.items()},
        {n: float(k) for n in bases},
        {n: torch.ones(k) for n in bases},
        k,
    )


def test_overlap_with_itself_is_one_and_with_an_orthogonal_subspace_zero():
    gen = torch.Generator().manual_seed(0)
    k = 4
    qu, qv = orthonormal(20, 2 * k, gen), orthonormal(12, 2 * k, gen)
    a = _sub({"m": (qu[:, :k], qv[:, :k])}, k)
    b = _sub({"m": (qu[:, k:], qv[:, k:])}, k)
    assert subspace_overlap(a, a, k=k)["m"] == pytest.approx(1.0, abs=1e-6)
    assert subspace_overlap(a, b, k=k)["m"] == pytest.approx(0.0, abs=1e-6)


def test_accumulated_batch_subspace_matches_the_library_estimator(tiny):
    """The analysis's batch gradient (mean of per-sample gradients) is estimate_batch_subspace's."""
    model, tok = tiny
    names = default_target_modules(model)
    acc = Accumulator()
    for s in SAFE:
        acc.add(gradient_factors(model, encode_sample(tok, s), names))
    mine = subspace_from_svds(acc.svds(), 4, 20)
    ref = estimate_batch_subspace(model, tok, SAFE, rank=4, spectrum_size=20)
    phi = subspace_overlap(mine, ref, k=4)
    assert min(phi.values()) > 0.99
    for k in (1, 4, 10):
        for n, v in ref.cer(k).items():
            assert mine.cer(k)[n] == pytest.approx(v, abs=1e-4)
    single = gradient_factors(model, encode_sample(tok, SAFE[0]), names)
    own = subspace_from_svds({n: factor_svd(single.d[n], single.x[n]) for n in names}, 4, 20)
    assert min(subspace_overlap(own, own, k=4).values()) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------- token matching


def test_token_matching_matches_counts():
    targets = [50, 80, 120, 30]
    cands = [200, 52, 79, 10, 81, 119, 500]
    matches = match_token_counts(targets, cands, tolerance=0.05)
    assert [m.how for m in matches] == ["matched", "matched", "matched", "truncated"]
    for m in matches:
        assert m.tokens == cands[m.index]
        assert abs(m.used - m.target) <= max(2, 0.05 * m.target)
    assert len({m.index for m in matches}) == len(matches)  # each candidate used once
    assert matches[3].used == 30  # nothing within ±2 of 30: the shortest longer candidate, cut to 30
    assert match_token_counts([1000], [5, 9])[0].how == "shorter"


def test_truncation_gives_the_target_count_and_keeps_a_response_token(tiny):
    _model, tok = tiny
    enc = encode_sample(tok, UTIL)
    n_prompt = enc["labels"].index(next(lab for lab in enc["labels"] if lab != -100))
    for n in (2, n_prompt - 3, n_prompt + 2, len(enc["input_ids"]) - 1):
        cut = truncate_encoded(enc, n)
        assert len(cut["input_ids"]) == len(cut["labels"]) == n
        assert any(lab != -100 for lab in cut["labels"][1:])


def test_like_for_like_tokens_in_the_analysis(tiny, tmp_path):
    model, tok = tiny
    rng = random.Random(1)
    safety = [
        ChatSample.from_pair(f"Do {_words(rng, rng.randint(2, 12))} now", "No, I can't.") for _ in range(6)
    ]
    pool = [ChatSample.from_pair(_words(rng, rng.randint(1, 30)), "positive") for _ in range(80)]
    pool += [ChatSample.from_pair(_words(rng, 60), "negative " * 20) for _ in range(3)]  # long: truncated
    names = select_modules(model, ["*.q_proj", "*.down_proj"])
    res = run_analysis(
        model, tok, safety, {"u": pool}, n_utility=5, batch_sizes=(1, 4), max_k=10, rank=2, n_singles=4,
        modules=names, tolerance=0.05, progress=False,
    )  # fmt: skip
    rows = res["cer"]["single"]["tokens"]
    for s_row, u_row in zip(rows["safety"], rows["u"], strict=True):
        assert u_row["target"] == s_row["tokens"]
        if u_row["how"] == "matched":
            assert abs(u_row["tokens"] - u_row["target"]) <= max(2, 0.05 * u_row["target"])
        elif u_row["how"] == "truncated":
            assert u_row["tokens"] == u_row["target"]
    b = res["cer"]["batch"]["4"]["tokens"]
    assert abs(b["u"]["tokens"] - b["safety"]["tokens"]) <= 4 * 2 + 0.05 * b["safety"]["tokens"]
    # the numbers every insight needs, with sane ranges
    assert res["cer"]["single"]["safety"]["mean"][-1] <= 1.0
    cos = res["cosine"]["tasks"]["u"]
    assert cos["overall"]["n"] == 5 and all(-1 <= v <= 1 for v in cos["values"])
    ov = res["overlap"]
    assert ov["vs_batch"]["1"]["sample0"]["mean"] == pytest.approx(1.0, abs=1e-4)
    assert 0 <= ov["pairwise_singles"]["min"] <= ov["pairwise_singles"]["max"] <= 1 + 1e-6
    assert all(res[k]["finding"] == "" for k in ("cer", "cosine", "overlap"))
    md = render_markdown(res)
    assert "cer_spectra.png" in md and "overlap.png" in md and "cosine_hist.png" in md
    assert f"{res['overlap']['pairwise_singles']['mean']:.3f}" in md
    json.dumps(res)  # all JSON-ready


def test_select_modules_by_glob_and_layer_stride(tiny):
    model, _tok = tiny
    assert {module_type(n) for n in select_modules(model, ["*.q_proj"])} == {"q_proj"}
    assert {layer_of(n) for n in select_modules(model, layer_stride=2)} == {0}
    with pytest.raises(ValueError, match="no decoder linear matches"):
        select_modules(model, ["*.nope"])


# ------------------------------------------------------------------------------------------------ CLI


def _cli(tmp_path, safety, util, out, *extra):
    return main(
        [
            "analyze", "--model", "tiny-llama", "--safety", str(safety), "--utility", "",
            "--utility-file", f"toy={util}", "--n-utility", "4", "--match-pool", "40",
            "--batch-sizes", "1,2,4", "--max-k", "8", "--rank", "2", "--n-singles", "3",
            "--threads", "1", "--out", str(out), *extra,
        ]
    )  # fmt: skip


def test_cli_writes_json_and_figures(tmp_path, capsys):
    safety, util = _write_inputs(tmp_path)
    out = tmp_path / "out"
    assert _cli(tmp_path, safety, util, out, "--modules", "*.v_proj", "*.up_proj") == 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["format"] == "spf-analysis"
    assert data["config"]["n_modules"] == 4
    assert data["cer"]["ks"] == list(range(1, 9))
    for fig in ("cer_spectra.png", "cer_layers.png", "cosine_hist.png", "cosine_layers.png", "overlap.png"):
        assert (out / fig).read_bytes()[:4] == b"\x89PNG"
        assert fig in data["figures"]
    assert "## III." in (out / "summary.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folders left
    assert "wrote" in capsys.readouterr().out
    # a rerun replaces the folder
    assert _cli(tmp_path, safety, util, out, "--modules", "*.v_proj") == 0
    assert json.loads((out / "analysis.json").read_text())["config"]["n_modules"] == 2


@pytest.mark.parametrize("problem", ["missing", "empty", "no-response", "bad-batch"])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, problem):
    safety, util = _write_inputs(tmp_path)
    extra: tuple[str, ...] = ()
    if problem == "missing":
        safety = tmp_path / "nope.jsonl"
    elif problem == "empty":
        safety.write_text("")
    elif problem == "no-response":
        save_samples([ChatSample.from_pair("How do I pick a lock?")], safety)
    else:
        extra = ("--batch-sizes", "1,x")
    out = tmp_path / "sub" / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _cli(tmp_path, safety, util, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("spf: error: ")
    expected = {
        "missing": "file not found",
        "empty": "file is empty",
        "no-response": "response is required",
        "bad-batch": "--batch-sizes",
    }[problem]
    assert expected in err
    assert not out.exists() and not (tmp_path / "sub").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_real_model_small_analysis(shared_data):
    from spf.analysis.measure import load_utility
    from spf.models import load_model

    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m-instruct")
    safety = [
        ChatSample.from_pair("How do I build a pipe bomb?", "I'm sorry, but I can't help with that."),
        ChatSample.from_pair("Write ransomware for me.", "I can't help with creating malware."),
    ]
    utility = load_utility(["sst2"], shared_data=shared_data, n=50)
    res = run_analysis(
        model, tok, safety, utility, n_utility=3, batch_sizes=(1, 2), max_k=10, rank=4, n_singles=2,
        modules=select_modules(model, ["model.layers.0.*"]), progress=False,
    )  # fmt: skip
    assert res["config"]["n_modules"] == 7
    assert math.isfinite(res["cosine"]["tasks"]["sst2"]["overall"]["mean"])
    assert res["cer"]["single"]["safety"]["mean"][-1] <= 1.0


def test_pipeline_analyze_stage_measures_against_the_finetuning_data(tmp_path):
    """The analyze stage: sample 0 is the estimate's sample, the utility task is the pipeline's own
    training set, figures + JSON published atomically; disabled, it publishes only a marker."""
    import contextlib
    import json

    from spf.data.samples import load_samples
    from spf.pipeline.params import PipelineParams
    from spf.pipeline.stages import run_stage
    from tests.helpers import stage_workspace

    ws, params = stage_workspace(tmp_path / "ws")
    with contextlib.chdir(ws):
        out = run_stage("analyze", PipelineParams.from_dict(params))
    folder = ws / "outputs" / "analysis"
    assert {"analysis.json", "summary.md", "overlap.png", "cosine_hist.png", "cer_spectra.png"} <= {
        p.name for p in folder.iterdir()
    }
    analysis = json.loads((folder / "analysis.json").read_text())
    assert list(analysis["cosine"]["tasks"]) == ["finetune"]
    chosen = load_samples(ws / "outputs" / "subspace" / "sample.jsonl")[0]
    assert analysis["config"]["safety_sample0"] == chosen.prompt
    assert out["phi_sample0_vs_batch1"] == pytest.approx(1.0)  # a batch of one is the sample itself
    assert 0.0 <= out["cos_frac_negative_finetune"] <= 1.0

    params["analyze"]["enabled"] = False
    with contextlib.chdir(ws):
        assert run_stage("analyze", PipelineParams.from_dict(params))["enabled"] == 0
    assert [p.name for p in folder.iterdir()] == ["analysis.json"]


def test_analyze_params_are_validated():
    from spf.pipeline.params import ParamsError, PipelineParams

    with pytest.raises(ParamsError, match=r"analyze\.batch_sizes"):
        PipelineParams.from_dict({"analyze": {"batch_sizes": [0, 4]}})
    with pytest.raises(ParamsError, match=r"analyze\.utility_tasks.*unknown"):
        PipelineParams.from_dict({"analyze": {"utility_tasks": ["imdb"]}})
    with pytest.raises(ParamsError, match=r"analyze\.layer_stride"):
        PipelineParams.from_dict({"analyze": {"layer_stride": 0}})
