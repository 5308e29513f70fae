"""Typed pipeline parameters (spf/pipeline/params.py): loading, validation messages, overrides, CLI failure mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spf.pipeline.params import ParamsError, PipelineParams, apply_overrides, load_params
from spf.pipeline.presets import smoke_params

REPO = Path(__file__).resolve().parents[2]


def write_params(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- loading


def test_defaults_load() -> None:
    p = PipelineParams()
    p.validate(check_files=False)
    assert p.finetune.method == "spf"
    assert p.estimate.rank >= 1
    assert p.runtime.workdir == "outputs"
    assert p.stage_dir("data") == Path("outputs") / "data"
    assert PipelineParams.from_dict(p.to_dict(), source="x").to_dict() == p.to_dict()


def test_missing_default_file_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPF_SHARED_DATA", str(tmp_path))  # the default scenario (sst2) needs the folder
    assert load_params("params.yaml").to_dict() == PipelineParams().to_dict()


def test_missing_named_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"nope\.yaml.*does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_repo_params_yaml_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the shipped params use sst2, which needs the public data folder; only its existence is checked here
    monkeypatch.setenv("SPF_SHARED_DATA", str(tmp_path))
    p = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # every key in the file is a known field and round-trips unchanged (no silently ignored knobs)
    out = p.to_dict()
    for section, values in raw.items():
        for key, value in values.items():
            assert out[section][key] == value, f"{section}.{key}"


def test_repo_params_cover_every_field() -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(PipelineParams().to_dict())
    for section, values in PipelineParams().to_dict().items():
        assert set(raw[section]) == set(values), section


# ---------------------------------------------------------------------------------------- validation

TINY = smoke_params()


def test_tiny_params_load(tmp_path: Path) -> None:
    p = load_params(write_params(tmp_path / "tiny.yaml", TINY))
    assert p.prepare.scenario == "sentiment" and p.align.enabled is False and p.estimate.rank == 2
    assert p.evaluate.suites == ["harmful", "overrefusal"]
    assert p.finetune.lr == PipelineParams().finetune.lr  # unspecified keys keep their defaults


BAD = [
    pytest.param({"bogus": {"x": 1}}, "bogus", "unknown key", id="unknown-section"),
    pytest.param({"finetune": {"stpes": 3}}, "finetune.stpes", "unknown key", id="unknown-key"),
    pytest.param({"finetune": {"steps": "ten"}}, "finetune.steps", "must be int", id="wrong-type"),
    pytest.param({"finetune": {"steps": 2.5}}, "finetune.steps", "must be int", id="float-for-int"),
    pytest.param({"finetune": {"steps": True}}, "finetune.steps", "must be int", id="bool-for-int"),
    pytest.param({"align": {"enabled": "yes"}}, "align.enabled", "must be bool", id="str-for-bool"),
    pytest.param({"finetune": {"method": "lorra"}}, "finetune.method", "'lorra'", id="unknown-method"),
    pytest.param({"estimate": {"rank": -1}}, "estimate.rank", "≥ 1", id="negative-rank"),
    pytest.param({"estimate": {"rank": 0}}, "estimate.rank", "≥ 1", id="zero-rank"),
    pytest.param({"finetune": {"lr": float("nan")}}, "finetune.lr", "finite", id="nan-lr"),
    pytest.param({"finetune": {"lr": float("inf")}}, "finetune.lr", "finite", id="inf-lr"),
    pytest.param({"prepare": {"p": 1.5}}, "prepare.p", "[0, 1]", id="p-above-1"),
    pytest.param({"prepare": {"p": float("nan")}}, "prepare.p", "[0, 1]", id="nan-p"),
    pytest.param({"gate": {"max_harmful_rate": 2}}, "gate.max_harmful_rate", "[0, 1]", id="gate-rate"),
    pytest.param({"evaluate": {"suites": ["harmful", "bad"]}}, "evaluate.suites", "list", id="bad-suite"),
    pytest.param({"evaluate": {"suites": ["overrefusal"]}}, "evaluate.suites", "harmful", id="no-harmful"),
    pytest.param({"evaluate": {"limit": 0}}, "evaluate.limit", "≥ 1", id="zero-limit"),
    pytest.param({"finetune": {"save_every": -1}}, "finetune.save_every", "≥ 0", id="negative-save"),
    pytest.param({"runtime": {"workdir": "../x"}}, "runtime.workdir", "relative", id="workdir-up"),
    pytest.param({"runtime": {"workdir": "/tmp/x"}}, "runtime.workdir", "relative", id="workdir-abs"),
    pytest.param({"finetune": 3}, "finetune", "mapping", id="section-not-mapping"),
    # finetune: is TrainConfig's shape; its own __post_init__ checks, named from the params root
    pytest.param({"finetune": {"lora": {"r": 0}}}, "finetune.lora.r", "≥ 1", id="lora-r"),
    pytest.param({"finetune": {"lora": {"rr": 4}}}, "finetune.lora.rr", "unknown key", id="lora-unknown"),
    pytest.param({"finetune": {"spf": {"mode": "x"}}}, "finetune.spf.mode", "one of", id="spf-mode"),
    pytest.param(
        {"finetune": {"baselines": {"lisa_rho": -1.0}}}, "finetune.baselines.lisa_rho", "≥ 0", id="lisa-rho"
    ),
    pytest.param({"finetune": {"lora_r": 4}}, "finetune.lora_r", "moved to finetune.lora.r", id="moved-lora"),
    pytest.param({"finetune": {"mode": "x"}}, "finetune.mode", "moved to finetune.spf.mode", id="moved-mode"),
    pytest.param(
        {"finetune": {"lisa_rho": 1.0}},
        "finetune.lisa_rho",
        "moved to finetune.baselines.lisa_rho",
        id="moved-lisa",
    ),
    pytest.param(
        {"finetune": {"spf": {"rank": 4}}}, "finetune.spf.rank", "moved to estimate.rank", id="spf-rank"
    ),
    pytest.param(
        {"gate": {"max_harmful_rate": float("nan")}}, "gate.max_harmful_rate", "[0, 1]", id="gate-nan"
    ),
    pytest.param(
        {"finetune": {"baselines": {"safety_data": "nope.jsonl"}}},
        "finetune.baselines.safety_data",
        "does not exist",
        id="no-baseline-data",
    ),
    pytest.param(
        {"align": {"refusals": "missing/refusals.jsonl"}},
        "align.refusals",
        "does not exist",
        id="no-refusals",
    ),
    pytest.param(
        {"align": {"benign": ["missing.jsonl"]}}, "align.benign[0]", "does not exist", id="no-benign"
    ),
    pytest.param(
        {"prepare": {"safety_samples": "nope.jsonl"}}, "prepare.safety_samples", "exist", id="no-safety"
    ),
    pytest.param({"prepare": {"shared_data": "no/such/dir"}}, "prepare.shared_data", "exist", id="no-shared"),
]


@pytest.mark.parametrize(("override", "key", "why"), BAD)
def test_invalid_params_name_file_and_key(tmp_path: Path, override: dict, key: str, why: str) -> None:
    data = {
        **TINY,
        **{s: {**TINY.get(s, {}), **v} if isinstance(v, dict) else v for s, v in override.items()},
    }
    path = write_params(tmp_path / "bad-params.yaml", data)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    msg = str(info.value)
    assert str(path) in msg and "bad-params.yaml" in msg
    assert f": {key}:" in msg, msg
    assert why in msg, msg


def test_finetune_section_is_train_config_minus_the_stage_paths() -> None:
    from dataclasses import fields

    from spf.pipeline.params import FinetuneParams
    from spf.training.config import SPFSettings, TrainConfig

    stage_filled = {"model", "data", "out", "heldout_safety", "threads", "device"}
    assert {f.name for f in fields(FinetuneParams)} == {f.name for f in fields(TrainConfig)} - stage_filled
    spf_fields = {f.name for f in fields(PipelineParams().finetune.spf)}
    assert spf_fields == {f.name for f in fields(SPFSettings)} - {
        "subspace",
        "sample",
        "sample_index",
        "rank",
    }
    # the pipeline's own defaults where they differ from `spf train`'s
    f = PipelineParams().finetune
    assert (f.steps, f.lr, f.batch_size, f.save_every) == (40, 5e-4, 8, 10)


@pytest.mark.parametrize("method", ["spf", "vanilla", "lisa"])
def test_finetune_section_builds_the_stage_train_config(method: str) -> None:
    # SPF's own knobs only under method: spf (elsewhere they would be ignored, which is an error)
    spf = {"refresh_every": 3} if method == "spf" else {}
    p = PipelineParams.from_dict(
        {**TINY, "finetune": {**TINY["finetune"], "method": method, "lora": {"r": 4}, "spf": spf}}, "x"
    )
    cfg = p.finetune.train_config(
        model="m",
        data="d",
        out="o",
        heldout_safety="h",
        subspace="s",
        rank=7,
        safety_data="shipped.jsonl",
        threads=2,
    )
    assert (cfg.model, cfg.data, cfg.out, cfg.heldout_safety, cfg.threads) == ("m", "d", "o", "h", 2)
    assert (cfg.method, cfg.lora.r, cfg.steps, cfg.batch_size) == (method, 4, 2, 2)
    # every method tracks the loss on the subspace's sample; only SPF projects, with the estimate's rank
    if method == "spf":
        assert (cfg.spf.subspace, cfg.spf.rank, cfg.spf.refresh_every) == ("s", 7, 3)
    else:
        assert (cfg.spf.subspace, cfg.spf.rank, cfg.spf.refresh_every) == ("s", 8, 1)
    # only the baselines get safety pairs: the default when the section leaves them null
    assert cfg.baselines.safety_data == ("shipped.jsonl" if method == "lisa" else None)


def test_nan_written_as_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(TINY) + "\n")
    text = path.read_text().replace("finetune:\n", "finetune:\n  lr: .nan\n", 1)
    path.write_text(text)
    with pytest.raises(ParamsError, match=r"params\.yaml: finetune\.lr: must be a finite number"):
        load_params(path)


def test_scenario_without_shared_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import spf.data.locate

    monkeypatch.delenv("SPF_SHARED_DATA", raising=False)
    monkeypatch.setattr(spf.data.locate, "REPO_SHARED_DATA", tmp_path / "no-shared")
    path = write_params(tmp_path / "p.yaml", {**TINY, "prepare": {"scenario": "harmful-mix"}})
    with pytest.raises(ParamsError, match=r"p\.yaml: prepare\.scenario: 'harmful-mix' needs the public data"):
        load_params(path)
    # the default scenario runs on the shipped sets instead (tests/pipeline/test_inputs.py runs its prepare stage)
    load_params(write_params(tmp_path / "q.yaml", {**TINY, "prepare": {"scenario": "sst2"}}))


def test_bad_shared_data_env_is_a_params_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPF_SHARED_DATA", str(tmp_path / "absent"))
    path = write_params(tmp_path / "p.yaml", {**TINY, "prepare": {"scenario": "sst2"}})
    with pytest.raises(ParamsError, match=r"p\.yaml: prepare\.shared_data: .*absent"):
        load_params(path)


def test_existing_input_files_accepted(tmp_path: Path) -> None:
    refusals = tmp_path / "r.jsonl"
    refusals.write_text("{}\n")
    data = {**TINY, "align": {**TINY["align"], "refusals": str(refusals), "benign": [str(refusals)]}}
    p = load_params(write_params(tmp_path / "p.yaml", data))
    assert p.align.refusals == str(refusals) and p.align.benign == [str(refusals)]


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("prepare:\n  n: 16\nfinetune:\n  steps: [2\n  lr: 1\n")
    with pytest.raises(ParamsError, match=r"params\.yaml:\d+: not valid YAML") as info:
        load_params(path)
    line = int(str(info.value).split(f"{path}:", 1)[1].split(":", 1)[0])
    assert 4 <= line <= 6


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: expected a mapping"):
        load_params(path)


# ----------------------------------------------------------------------------------------- overrides


def test_overrides_list_form(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml", TINY)
    p = load_params(path, ["finetune.steps=3", "estimate.rank=4"])
    assert p.finetune.steps == 3 and p.estimate.rank == 4
    assert p.finetune.batch_size == 2  # untouched keys keep the file's values
    assert yaml.safe_load(path.read_text()) == TINY  # the file itself is not modified


def test_overrides_dict_form(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml", TINY)
    p = load_params(path, {"finetune.steps": 3, "estimate.rank": 4, "finetune.lr": 1e-3})
    assert (p.finetune.steps, p.estimate.rank, p.finetune.lr) == (3, 4, 1e-3)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml", TINY)
    p = load_params(path, ["evaluate.suites=[harmful]", "align.enabled=false", "evaluate.limit=null"])
    assert p.evaluate.suites == ["harmful"] and p.align.enabled is False and p.evaluate.limit is None


def test_override_into_empty_section(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(TINY) + "gate:\n")  # `gate:` with nothing under it is null
    p = load_params(path, ["gate.max_harmful_rate=0.2"])
    assert p.gate.max_harmful_rate == 0.2


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["finetune.steps=abc"], r"params\.yaml: finetune\.steps: must be int"),
        ({"finetune.steps": "3"}, r"params\.yaml: finetune\.steps: must be int"),
        (["estimate.rank=-1"], r"params\.yaml: estimate\.rank: must be ≥ 1"),
        (["finetune.method=lorra"], r"params\.yaml: finetune\.method: must be one of"),
        (["finetune.lr=.nan"], r"params\.yaml: finetune\.lr: must be a finite"),
        (["finetune.nosuch=1"], r"params\.yaml: finetune\.nosuch: unknown key"),
        (["nosuch.key=1"], r"params\.yaml: nosuch: unknown key"),
        (["finetune.steps"], r"override 'finetune\.steps': expected KEY=VALUE"),
        (["=3"], r"expected KEY=VALUE"),
        (["finetune.steps.x=1"], r"override finetune\.steps\.x: steps is not a section"),
    ],
)
def test_overrides_are_type_checked(tmp_path: Path, overrides, pattern: str) -> None:
    path = write_params(tmp_path / "params.yaml", TINY)
    with pytest.raises(ParamsError, match=pattern):
        load_params(path, overrides)


def test_apply_overrides_copies() -> None:
    data = {"finetune": {"steps": 2}}
    out = apply_overrides(data, ["finetune.steps=5", "estimate.rank=3"])
    assert out == {"finetune": {"steps": 5}, "estimate": {"rank": 3}}
    assert data == {"finetune": {"steps": 2}}
    assert apply_overrides(data, None) == data


# ----------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("stage", ["prepare", "finetune"])
def test_cli_bad_params_exits_2_and_writes_nothing(
    stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from spf.cli.main import main

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "bad.yaml", {**TINY, "finetune": {**TINY["finetune"], "method": "lorra"}})
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([stage, "--params", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spf: error: ")
    assert "bad.yaml" in err and "finetune.method" in err and "lorra" in err
    assert not (tmp_path / "outputs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_bad_override_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from spf.cli.main import main

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", TINY)
    assert main(["finetune", "--params", "params.yaml", "-S", "estimate.rank=-1"]) == 2
    err = capsys.readouterr().err
    assert "spf: error: " in err and "params.yaml: estimate.rank" in err
    assert not (tmp_path / "outputs").exists()


def test_cli_missing_params_file_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from spf.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--params", "missing.yaml"]) == 2
    assert "spf: error: missing.yaml: parameter file does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_analyze_accepts_only_the_public_utility_tasks_it_can_read() -> None:
    """`sentiment` is an evaluation task (the shipped dev split); the analysis reads public sets only, so
    the params check refuses it there instead of letting the analyze stage fail minutes in."""
    from spf.pipeline.params import PipelineParams

    with pytest.raises(ParamsError, match=r"analyze\.utility_tasks: unknown task\(s\) \['sentiment'\]"):
        PipelineParams.from_dict({"analyze": {"utility_tasks": ["sentiment"]}})
    assert PipelineParams.from_dict(
        {"evaluate": {"utility_tasks": ["sentiment"]}}
    ).evaluate.utility_tasks == ["sentiment"]
