"""Hostile configuration: params.yaml, `spf train --config`, bench files and the command-line flags.

Every case is refused before any work with one line naming the file/line, key or flag, exit status 2 for
the CLI, and nothing written (the temp folder's tree is unchanged). The flag, --config and params.yaml
forms of one mistake meet the same check (TrainConfig's), so they give the same verdict.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from spf.bench.config import BenchConfigError, load_bench_config
from spf.cli.main import main
from spf.pipeline.params import ParamsError, load_params
from spf.training.config import (
    EXCLUSIVE,
    SETTINGS_USED_BY,
    BaselineSettings,
    LoraSettings,
    SPFSettings,
    TrainConfig,
)
from tests.helpers import tree_state

SHIPPED_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty workspace, the current directory (pipeline stages read ./params.yaml)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str], root: Path) -> str:
    """Run ``spf argv``; assert exit 2, exactly one stderr line, and nothing written under ``root``.
    Returns that line."""
    before = tree_state(root)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert len(err) < 400, err  # never a huge value echoed
    assert tree_state(root) == before
    return err.strip()


def _train(root: Path, *extra: str) -> list[str]:
    return ["train", "--model", "tiny-llama", "--data", str(root / "d.jsonl"), "--out", str(root / "out"),
            "--method", "vanilla", *extra]  # fmt: skip


def _params_error(path: Path | str, overrides: list[str] | None = None) -> str:
    with pytest.raises(ParamsError) as info:
        load_params(path, overrides)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    return message


# ------------------------------------------------------------------------------ params.yaml, as a file

# nine levels of nine aliases: ~300 bytes that PyYAML expands to 9**9 (387 million) strings
BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_alias_bomb_in_params_is_refused_at_once_naming_file_and_line(ws: Path, capsys) -> None:
    assert 250 < len(BOMB.encode()) < 400
    (ws / "params.yaml").write_text(BOMB)
    start = time.monotonic()
    message = _params_error(ws / "params.yaml")
    assert time.monotonic() - start < 1.0
    assert message.startswith(f"{ws / 'params.yaml'}:1:") and "anchors" in message
    start = time.monotonic()
    err = _cli(["prepare", "--params", "params.yaml"], capsys, ws)
    assert time.monotonic() - start < 1.0 and "params.yaml:1:" in err


def test_alias_in_an_override_is_refused(ws: Path) -> None:
    assert "aliases" in _params_error(ws / "params.yaml", ["finetune.steps=*a"])


def test_second_finetune_block_is_refused_naming_its_line(ws: Path, capsys) -> None:
    (ws / "params.yaml").write_text("finetune:\n  steps: 3\nestimate:\n  rank: 2\nfinetune:\n  lr: 0.1\n")
    message = _params_error(ws / "params.yaml")
    assert message.startswith(f"{ws / 'params.yaml'}:5: duplicate key 'finetune' (first at line 1)")
    assert "params.yaml:5: duplicate key 'finetune'" in _cli(
        ["finetune", "--params", "params.yaml"], capsys, ws
    )


def test_empty_params_file_is_an_error_but_a_missing_one_means_defaults(ws: Path, capsys) -> None:
    (ws / "params.yaml").write_bytes(b"")
    assert "params.yaml: empty document" in _params_error(ws / "params.yaml")
    (ws / "params.yaml").write_text("# only a comment\n")
    assert "empty document" in _params_error(ws / "params.yaml")
    assert "params.yaml: empty document" in _cli(["prepare", "--params", "params.yaml"], capsys, ws)
    (ws / "params.yaml").unlink()
    assert load_params(ws / "params.yaml").finetune.steps == 40  # missing: the defaults, as before


def test_params_yaml_that_is_a_folder_is_named(ws: Path, capsys) -> None:
    (ws / "params.yaml").mkdir()
    assert _params_error(ws / "params.yaml") == f"{ws / 'params.yaml'}: is a folder, expected a file"
    assert "params.yaml: is a folder" in _cli(["prepare", "--params", "params.yaml"], capsys, ws)


def test_params_that_is_not_a_mapping_or_has_a_giant_number(ws: Path) -> None:
    (ws / "params.yaml").write_text("- prepare\n- finetune\n")
    assert "expected a mapping of sections, got a list of 2 item(s)" in _params_error(ws / "params.yaml")
    (ws / "params.yaml").write_text("finetune:\n  steps: " + "9" * 5000 + "\n")
    message = _params_error(ws / "params.yaml")  # PyYAML's int limit: a ParamsError, not a traceback
    assert message.startswith(str(ws / "params.yaml"))
    (ws / "params.yaml").write_text("finetune: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert _params_error(ws / "params.yaml") == f"{ws / 'params.yaml'}: nested too deeply to be a config"


def test_a_huge_wrong_value_is_not_echoed(ws: Path) -> None:
    (ws / "params.yaml").write_text(yaml.safe_dump({"finetune": {"steps": "x" * 100_000}}))
    assert "finetune.steps: must be int, got 'xxxx" in _params_error(ws / "params.yaml")
    (ws / "params.yaml").write_text(yaml.safe_dump({"finetune": {"steps": list(range(50_000))}}))
    assert "got a list of 50000 item(s)" in _params_error(ws / "params.yaml")


# ------------------------------------------------------------------------------ spf train --config


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("dup.json", '{"steps": 2, "lora": {"r": 4}, "steps": 3}', "duplicate key 'steps'"),
        ("dup.yaml", "steps: 2\nlora:\n  r: 4\nsteps: 3\n", ":4: duplicate key 'steps' (first at line 1)"),
        ("list.json", "[1, 2]", "expected a mapping of TrainConfig fields, got a list of 2 item(s)"),
        ("scalar.yaml", "just words\n", "expected a mapping of TrainConfig fields, got 'just words'"),
        ("syntax.json", '{"steps": 2,', ":1: not valid JSON"),
        ("syntax.yaml", "steps: [1, 2\n", "not valid YAML"),
        ("empty.yaml", "", "empty document"),
        ("alias.yaml", "lora: &l {r: 4}\nx: *l\n", ":1: YAML anchors (&l) are not allowed"),
        ("nan.json", '{"lr": NaN}', "NaN is not valid JSON"),
        ("type.json", '{"steps": "10"}', "steps: must be an integer ≥ 1, got '10'"),
        ("strtype.json", '{"heldout_safety": 5}', "heldout_safety: must be str or null, got 5"),
        ("section.json", '{"lora": 5}', "lora: must be a mapping of LoraSettings fields, got 5"),
        ("subkey.json", '{"lora": {"rr": 1}}', "lora.rr: unknown key"),
        ("listtype.json", '{"lora": {"target_modules": "q_proj"}}', "lora.target_modules: must be a list"),
        ("unknown.json", '{"stepz": 1}', "unknown training option(s): stepz"),
        ("intkey.yaml", "1: 2\n", "unknown training option(s): 1"),
    ],
)
def test_bad_config_file(ws: Path, capsys, name: str, text: str, expected: str) -> None:
    (ws / name).write_text(text)
    err = _cli(_train(ws, "--config", str(ws / name)), capsys, ws)
    assert err.startswith("spf: error: ") and str(ws / name) in err and expected in err


def test_config_that_is_a_folder(ws: Path, capsys) -> None:
    (ws / "c.yaml").mkdir()
    assert f"--config {ws / 'c.yaml'}: is a folder" in _cli(
        _train(ws, "--config", str(ws / "c.yaml")), capsys, ws
    )


# ------------------------------------------------------------------------------ device and threads


@pytest.mark.parametrize("bad", ["gpu7", "CUDA", "cuda:x", "cuda:", "tpu", "", "cpu:0"])
def test_bad_device_strings(ws: Path, capsys, bad: str) -> None:
    err = _cli(_train(ws, "--device", bad), capsys, ws)
    assert err.startswith("spf: error: --device: must be cpu, cuda, cuda:N or mps")
    err = _cli(["eval", "--model", "tiny-llama", "--suite", "harmful", "--out", str(ws / "o"), "--device", bad],
               capsys, ws)  # fmt: skip
    assert "argument --device: must be cpu, cuda, cuda:N or mps" in err
    assert "runtime.device: must be cpu" in _params_error(ws / "params.yaml", [f"runtime.device={bad!r}"])


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("dev", ["cuda", "cuda:1", "mps"])
def test_accelerator_that_is_not_there(ws: Path, capsys, no_gpu, dev: str) -> None:
    assert "--device: " in _cli(_train(ws, "--device", dev), capsys, ws)
    err = _cli(["analyze", "--device", dev], capsys, ws)
    assert "argument --device:" in err and "no " in err and "device is available" in err
    message = _params_error(ws / "params.yaml", [f"runtime.device={dev}"])
    assert "runtime.device:" in message and "is available" in message


def test_cuda_index_beyond_the_devices(ws: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "--device: 'cuda:3' requested but only 1 CUDA device(s)" in _cli(
        _train(ws, "--device", "cuda:3"), capsys, ws
    )


def test_threads_below_one(ws: Path, capsys) -> None:
    assert "--threads: must be ≥ 1 or null, got -1" in _cli(_train(ws, "--threads", "-1"), capsys, ws)
    assert "--threads: must be ≥ 1 or null, got 0" in _cli(_train(ws, "--threads", "0"), capsys, ws)
    err = _cli(["estimate", "--threads", "0"], capsys, ws)
    assert "argument --threads: must be an integer ≥ 1, got 0" in err
    assert "runtime.threads: must be ≥ 1 or null, got -1" in _params_error(
        ws / "params.yaml", ["runtime.threads=-1"]
    )


def test_device_is_checked_in_the_config_itself() -> None:
    with pytest.raises(ValueError, match=r"^device: must be cpu"):
        TrainConfig(model="m", data="d", out="o", method="vanilla", device="gpu7")
    with pytest.raises(ValueError, match=r"^threads: must be ≥ 1"):
        TrainConfig(model="m", data="d", out="o", method="vanilla", threads=0)


# ------------------------------------------------------------------------------ numbers: finite, in range


@pytest.mark.parametrize(
    ("flag", "value", "key", "rest"),
    [
        ("--lr", "inf", "lr", "must be a finite number > 0, got inf"),
        ("--lr", "nan", "lr", "must be a finite number > 0, got nan"),
        ("--lr", "0", "lr", "must be a finite number > 0, got 0.0"),
        ("--lora-alpha", "nan", "lora.alpha", "must be a finite number > 0, got nan"),
        ("--lora-alpha", "-2", "lora.alpha", "must be a finite number > 0, got -2.0"),
        ("--lora-dropout", "nan", "lora.dropout", "must be in [0, 1), got nan"),
        ("--weight-decay", "inf", "weight_decay", "must be a finite number ≥ 0, got inf"),
        ("--max-grad-norm", "nan", "max_grad_norm", "must be a finite number > 0 or null, got nan"),
    ],
)
def test_non_finite_or_out_of_range_flag_and_param_give_one_verdict(
    ws: Path, capsys, flag: str, value: str, key: str, rest: str
) -> None:
    err = _cli(_train(ws, flag, value), capsys, ws)
    assert err == f"spf: error: {flag}: {rest}"
    yaml_value = {"inf": ".inf", "nan": ".nan"}.get(value, value)
    assert (
        _params_error("params.yaml", [f"finetune.{key}={yaml_value}"])
        == f"params.yaml: finetune.{key}: {rest}"
    )


def test_negative_alpha_from_config_names_file_and_the_same_key(ws: Path, capsys) -> None:
    (ws / "c.json").write_text(json.dumps({"lora": {"alpha": -2.0}}))
    err = _cli(_train(ws, "--config", str(ws / "c.json")), capsys, ws)
    assert err == f"spf: error: {ws / 'c.json'}: lora.alpha: must be a finite number > 0, got -2.0"


@pytest.mark.parametrize(
    ("flag", "value", "rest"),
    [
        ("--limit", "-5", "must be ≥ 1 or null, got -5"),  # was data[:-5]: all but the last five rows
        ("--limit", "0", "must be ≥ 1 or null, got 0"),
        ("--steps", "0", "must be ≥ 1, got 0"),
        ("--task-eval-n", "-1", "must be ≥ 0, got -1"),
        ("--keep-checkpoints", "-1", "must be ≥ 0, got -1"),
        ("--unlikelihood-batch-size", "0", "must be ≥ 1, got 0"),
    ],
)
def test_train_counts_are_checked_by_the_config(ws: Path, capsys, flag: str, value: str, rest: str) -> None:
    assert _cli(_train(ws, flag, value), capsys, ws) == f"spf: error: {flag}: {rest}"


def test_huge_int_for_a_float(ws: Path, capsys) -> None:
    (ws / "c.json").write_text('{"lr": 1' + "0" * 400 + "}")
    assert "lr: must be a finite number > 0, got an integer of" in _cli(
        _train(ws, "--config", str(ws / "c.json")), capsys, ws
    )


# ------------------------------------------------------------------------------ settings that would be ignored


def test_lora_setting_with_full_finetuning(ws: Path, capsys) -> None:
    err = _cli(_train(ws, "--finetune", "full", "--lora-r", "4"), capsys, ws)
    assert err == (
        "spf: error: --lora-r: set to 4, but ignored as --finetune full (LoRA settings apply to --finetune lora)"
    )
    (ws / "c.yaml").write_text("finetune: full\nlora:\n  r: 4\n")
    err = _cli(_train(ws, "--config", str(ws / "c.yaml")), capsys, ws)
    assert f"{ws / 'c.yaml'}: lora.r: set to 4, but ignored as" in err
    message = _params_error(SHIPPED_PARAMS, ["finetune.finetune=full", "finetune.lora.r=4"])
    assert message.endswith(
        "finetune.lora.r: set to 4, but ignored as finetune=full (LoRA settings apply to finetune=lora)"
    )
    # at its default the setting is not "given" (the shipped params.yaml lists every key at its default)
    cfg = TrainConfig(model="m", data="d", out="o", method="vanilla", finetune="full", lora={"r": 8})
    assert cfg.finetune == "full"


def test_shipped_params_with_full_finetuning_still_validates() -> None:
    p = load_params(SHIPPED_PARAMS, ["finetune.finetune=full"])
    assert p.finetune.finetune == "full" and p.finetune.lora.r == 8
    for method in ("vanilla", "safeinstr", "safegrad", "lisa"):
        assert (
            load_params(SHIPPED_PARAMS, [f"finetune.method={method}", "estimate.rank=16"]).finetune.method
            == method
        )


def test_safety_sample_with_subspace(ws: Path, capsys) -> None:
    err = _cli(_train(ws, "--method", "spf", "--subspace", "sub", "--safety-sample", "s.jsonl"), capsys, ws)
    assert err.startswith("spf: error: --safety-sample: give one of spf.subspace (--subspace) or spf.sample")
    (ws / "c.json").write_text(json.dumps({"method": "spf", "spf": {"subspace": "sub", "sample": "s.jsonl"}}))
    assert "c.json: spf.sample: give one of" in _cli(
        _train(ws, "--config", str(ws / "c.json"), "--method", "spf"), capsys, ws
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method", "spf", "--subspace", "s", "--lisa-rho", "0.5"], "--lisa-rho: set to 0.5, but ignored as --method spf"),
        (["--rank", "4"], "--rank: set to 4, but ignored as --method vanilla (SPF settings apply to --method spf"),
        (["--mode", "conflict"], "--mode: set to 'conflict', but ignored as --method vanilla"),
        (["--safety-data", "x.jsonl"], "--safety-data: set to 'x.jsonl', but ignored as --method vanilla"),
        (["--method", "lisa", "--safety-data", "x", "--safegrad-every", "2"], "--safegrad-every: set to 2, but ignored as --method lisa"),
        (["--full-params", "all"], "--full-params: set to 'all', but ignored as --finetune lora"),
        (["--unlikelihood-weight", "2"], "--unlikelihood-weight: set to 2.0, but ignored as unlikelihood.data (--unlikelihood-data) is not set"),
        (["--method", "spf", "--subspace", "s", "--sample-index", "2"], "--sample-index: set to 2, but ignored as spf.sample (--safety-sample) is not set"),
    ],
)  # fmt: skip
def test_ignored_flags_are_errors(ws: Path, capsys, argv: list[str], expected: str) -> None:
    err = _cli(_train(ws, *argv), capsys, ws)
    assert err.startswith(f"spf: error: {expected}"), err


def test_ignored_setting_in_params_yaml_names_the_key(ws: Path) -> None:
    message = _params_error(SHIPPED_PARAMS, ["finetune.baselines.lisa_rho=0.5"])
    assert message.endswith(
        "finetune.baselines.lisa_rho: set to 0.5, but ignored as method=spf (lisa_* applies to method=lisa)"
    )
    message = _params_error(SHIPPED_PARAMS, ["finetune.method=vanilla", "finetune.spf.mode=conflict"])
    assert "finetune.spf.mode: set to 'conflict', but ignored as method=vanilla" in message


def test_every_section_setting_is_classified() -> None:
    """A new LoRA/SPF/baseline knob must be added to SETTINGS_USED_BY (or be read by every method)."""
    listed = {k for _, _, keys, _ in SETTINGS_USED_BY for k in keys} | {k for g in EXCLUSIVE for k in g}
    for section, cls in (("lora", LoraSettings), ("spf", SPFSettings), ("baselines", BaselineSettings)):
        assert {f"{section}.{f.name}" for f in fields(cls)} <= listed


def test_bench_rank_only_goes_to_spf_cells(tmp_path: Path) -> None:
    from spf.bench.config import cells, train_config

    cfg_path = tmp_path / "b.yaml"
    cfg_path.write_text(
        "name: t\naligned: tiny-llama\nsubspace: {rank: 16}\n"
        "methods:\n  vanilla: {method: vanilla}\n  spf: {method: spf}\n"
        "scenarios:\n  s: {kind: sst2}\n"
    )
    cfg = load_bench_config(cfg_path)
    ranks = {c.method: train_config(cfg, c, tmp_path / "x").spf.rank for c in cells(cfg) if c.kind == "train"}
    assert ranks == {"vanilla": 8, "spf": 16}


def test_bench_shared_lora_is_dropped_for_a_full_cell_but_a_cells_own_is_refused(tmp_path: Path) -> None:
    from spf.bench.config import cells, train_config

    text = (
        "name: t\naligned: tiny-llama\ntrain: {lora: {r: 2}}\nmethods:\n  vanilla: {method: vanilla}\n"
        "scenarios:\n  s: {kind: sst2}\n"
        "ablations:\n  - {name: full, base: vanilla@s, train: {finetune: full}}\n"
    )
    (tmp_path / "b.yaml").write_text(text)
    cfg = load_bench_config(tmp_path / "b.yaml")  # the shared section is every cell's base
    full = next(c for c in cells(cfg) if c.id == "ablation:full")
    assert train_config(cfg, full, tmp_path / "x").lora.r == 8 and cfg.train == {"lora": {"r": 2}}
    (tmp_path / "b.yaml").write_text(text.replace("{finetune: full}", "{finetune: full, lora: {r: 4}}"))
    with pytest.raises(
        BenchConfigError, match=r"cell ablation:full: lora\.r: set to 4, but ignored as finetune=full"
    ):
        load_bench_config(tmp_path / "b.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BOMB, ":1: YAML anchors"),
        ("name: a\nname: b\n", ":2: duplicate key 'name'"),
        ("", "empty document"),
        ("name: t\naligned: m\nthreads: 0\n", "threads: must be ≥ 1"),
        ("name: t\naligned: m\ndevice: gpu7\n", "device: must be cpu"),
    ],
)
def test_bench_file_is_read_strictly(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "b.yaml").write_text(text)
    with pytest.raises(BenchConfigError, match=expected):
        load_bench_config(tmp_path / "b.yaml")


# ------------------------------------------------------------------------------ counts of the other commands


@pytest.mark.parametrize(
    ("argv", "flag", "low"),
    [
        (["data", "sst2", "--out", "o.jsonl", "--n", "-5"], "--n", 1),
        (["data", "sst2", "--out", "o.jsonl", "--n", "0"], "--n", 1),
        (["data", "sst2", "--out", "o.jsonl", "--epochs", "0"], "--epochs", 1),
        (["data", "sst2", "--out", "o.jsonl", "--offset", "-1"], "--offset", 0),
        (["eval", "--model", "m", "--suite", "harmful", "--out", "o", "--limit", "0"], "--limit", 1),
        (["eval", "--model", "m", "--suite", "harmful", "--out", "o", "--limit", "-3"], "--limit", 1),
        (["eval", "--model", "m", "--suite", "harmful", "--out", "o", "--batch-size", "0"], "--batch-size", 1),
        (["eval", "--model", "m", "--suite", "harmful", "--out", "o", "--max-new-tokens", "0"], "--max-new-tokens", 1),
        (["estimate", "--rank", "0"], "--rank", 1),
        (["estimate", "--index", "-1"], "--index", 0),
        (["estimate", "--batch", "0"], "--batch", 1),
        (["estimate", "--max-length", "1"], "--max-length", 2),
        (["analyze", "--n-utility", "-1"], "--n-utility", 1),
        (["analyze", "--max-k", "0"], "--max-k", 1),
        (["analyze", "--layer-stride", "0"], "--layer-stride", 1),
        (["align", "--steps", "0"], "--steps", 1),
        (["align", "--n-benign", "-2"], "--n-benign", 1),
        (["align", "--eval-max-new-tokens", "-1"], "--eval-max-new-tokens", 0),
        (["align", "--threads", "-1"], "--threads", 1),
        (["bench", "run", "b.yaml", "--lanes", "0"], "--lanes", 1),
    ],
)  # fmt: skip
def test_counts_are_checked_when_parsed(ws: Path, capsys, argv: list[str], flag: str, low: int) -> None:
    err = _cli(argv, capsys, ws)
    assert f"error: argument {flag}: must be an integer ≥ {low}, got" in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["data", "harmful-mix", "--out", "o.jsonl", "--p", "nan"], "--p"),
        (["data", "harmful-mix", "--out", "o.jsonl", "--p", "1.5"], "--p"),
        (["align", "--lr", "inf"], "--lr"),
        (["align", "--unlikelihood-weight", "nan"], "--unlikelihood-weight"),
        (["analyze", "--tolerance=-inf"], "--tolerance"),
    ],
)
def test_floats_of_the_other_commands_are_finite(ws: Path, capsys, argv: list[str], flag: str) -> None:
    assert f"error: argument {flag}: must be a finite number" in _cli(argv, capsys, ws)
