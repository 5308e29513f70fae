"""The `spf` command line: the command table, fast help, flags generated from TrainConfig, error mapping."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from spf.cli import main as cli
from spf.cli.args import add_dataclass_arguments
from spf.cli.errors import UsageError
from spf.cli.train import train_flags
from spf.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
BASE = ["train", "--model", "tiny-llama", "--data", "d.jsonl", "--out", "o", "--method", "vanilla"]


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def _config(*argv: str) -> TrainConfig:
    return cli._train_config(_parse(*argv))


def _fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f))
    return out


# ------------------------------------------------------------------------------------- fast help


_HELP_PROBE = """
import json, sys, time
from spf.cli.main import main
t0 = time.perf_counter()
try:
    main({argv!r})
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
print(json.dumps({{"code": code, "seconds": time.perf_counter() - t0, "heavy": heavy}}))
"""


def _probe(*argv: str) -> tuple[dict, str]:
    proc = _fresh(_HELP_PROBE.format(argv=list(argv)))
    assert proc.returncode == 0, proc.stderr
    *help_lines, last = proc.stdout.rstrip("\n").split("\n")
    return json.loads(last), "\n".join(help_lines)


def test_top_level_help_imports_no_heavy_library_and_is_fast() -> None:
    result, text = _probe("--help")
    assert result["heavy"] == [], f"`spf --help` imported {result['heavy']}"
    assert result["code"] == 0 and result["seconds"] < 2.0
    assert "COMMAND" in text and "finetune" in text


def test_train_help_does_not_import_torch() -> None:
    if not (ROOT / "spf" / "core" / "modes.py").is_file():
        pytest.skip("spf.training.config still imports the project modes from spf.core.optimizer (torch)")
    result, text = _probe("train", "-h")
    assert result["heavy"] == [], f"`spf train -h` imported {result['heavy']}"
    assert result["code"] == 0 and "--lora-r" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import spf

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"spf {cli.version()}"
    assert cli.version() in (spf.__version__, _installed_version())


def _installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spf")
    except PackageNotFoundError:
        return None


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_builds_its_options_and_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "-h"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: spf {name}")
    if cli.COMMANDS[name].params is not None:
        assert "--params" in out and "--set" in out


def test_stage_commands_require_params(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["finetune"])
    assert exit_.value.code == 2 and "--params" in capsys.readouterr().err


# ------------------------------------------------------------------------- generated train flags


def test_every_train_config_field_has_a_flag_with_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "-h"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    by_key = {f.key: f for f in train_flags()}
    for key, field in _fields(TrainConfig):
        assert key in by_key, f"no flag for TrainConfig field {key}"
        flag = by_key[key].flags[0]
        assert flag in text, flag
        assert field.metadata.get("help"), f"{key} has no help metadata"
        assert " ".join(field.metadata["help"].split()) in text


@pytest.mark.parametrize(
    ("argv", "key", "value"),
    [
        (["--subspace", "sub"], "spf.subspace", "sub"),
        (["--safety-sample", "s.jsonl"], "spf.sample", "s.jsonl"),
        (["--sample-index", "3"], "spf.sample_index", 3),
        (["--mode", "conflict"], "spf.mode", "conflict"),
        (["--project-on", "grad"], "spf.project_on", "grad"),
        (["--conflict-scope", "global"], "spf.conflict_scope", "global"),
        (["--refresh-every", "0"], "spf.refresh_every", 0),
        (["--rank", "3"], "spf.rank", 3),
        (["--lora-r", "2"], "lora.r", 2),
        (["--lora-alpha", "4"], "lora.alpha", 4.0),
        (["--limit", "5"], "limit_data", 5),
        (["--no-resume"], "resume", False),
        (["--safety-data", "x.jsonl"], "baselines.safety_data", "x.jsonl"),
        (["--lisa-rho", "0.5"], "baselines.lisa_rho", 0.5),
        (["--threads", "2"], "threads", 2),
        (["--device", "cpu"], "device", "cpu"),
        (["--max-grad-norm", "none"], "max_grad_norm", None),
        (["--lora-target-modules", "q_proj", "v_proj"], "lora.target_modules", ["q_proj", "v_proj"]),
        (["--no-diagnostics"], "spf.diagnostics", False),
    ],
)
def test_historical_flags_keep_their_meaning(argv: list[str], key: str, value: object) -> None:
    # a method-specific flag is given with a method that reads it (under another it is an error)
    if key == "spf.sample":
        argv = ["--method", "spf", *argv]
    elif key == "spf.sample_index":
        argv = ["--method", "spf", "--safety-sample", "s.jsonl", *argv]
    elif key.startswith("spf.") and key != "spf.subspace":
        argv = ["--method", "spf", "--subspace", "sub", *argv]
    elif key.startswith("baselines."):
        argv = ["--method", "lisa", "--safety-data", "x.jsonl", *argv]
    cfg = _config(*BASE, *argv).to_dict()
    for part in key.split("."):
        cfg = cfg[part]
    assert cfg == value


def test_hf_style_aliases_give_the_same_config() -> None:
    ours = _config(*BASE[:5], "--out", "o", "--lr", "0.01", "--steps", "7", "--batch-size", "3",
                   "--grad-accum", "2", "--seed", "5", "--method", "vanilla")  # fmt: skip
    hf = _config("train", "--model_name_or_path", "tiny-llama", "--data", "d.jsonl", "--output_dir", "o",
                 "--learning_rate", "0.01", "--max_steps", "7", "--per_device_train_batch_size", "3",
                 "--gradient_accumulation_steps", "2", "--seed", "5", "--method", "vanilla")  # fmt: skip
    assert hf.to_dict() == ours.to_dict()
    assert (ours.lr, ours.steps, ours.batch_size, ours.grad_accum, ours.seed) == (0.01, 7, 3, 2, 5)


def test_untyped_flags_leave_the_dataclass_defaults() -> None:
    cfg = _config(*BASE)
    assert (
        cfg.to_dict() == TrainConfig(model="tiny-llama", data="d.jsonl", out="o", method="vanilla").to_dict()
    )


def test_config_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(
        "model: tiny-llama\ndata: d.jsonl\nout: o\nmethod: vanilla\nsteps: 9\nlr: 0.5\nlora: {r: 3}\n"
    )
    cfg = _config("train", "--config", str(path), "--steps", "2", "--lora-alpha", "8")
    assert (cfg.steps, cfg.lr, cfg.lora.r, cfg.lora.alpha) == (2, 0.5, 3, 8.0)


def test_a_field_type_without_a_flag_form_is_a_loud_bug() -> None:
    @dataclasses.dataclass
    class Odd:
        table: dict[str, int] = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="no command-line form"):
        add_dataclass_arguments(argparse.ArgumentParser(), Odd)


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lora-r", "0"], "--lora-r: must be ≥ 1, got 0"),
        (["--rank", "0"], "--rank: must be ≥ 1, got 0"),
        (["--learning_rate", "0"], "--learning_rate: must be a finite number > 0, got 0.0"),
        (["--max-length", "1"], "--max-length: must be ≥ 2, got 1"),
        (["--lisa-task-steps", "0"], "--lisa-task-steps: must be an integer ≥ 1, got 0"),
    ],
)
def test_validation_error_names_the_flag_typed(argv, message, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*BASE, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spf: error: ") and message in err
    assert ": lora.r:" not in err and "spf.rank:" not in err


def test_validation_error_from_the_config_file_names_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"lora": {"r": 0}}))
    assert cli.main([*BASE, "--config", str(path)]) == 2
    assert f"spf: error: {path}: lora.r: must be ≥ 1, got 0" in capsys.readouterr().err
    path.write_text("{not json")
    assert cli.main([*BASE, "--config", str(path)]) == 2
    assert f"--config {path}:1: not valid JSON" in capsys.readouterr().err
    bad_yaml = tmp_path / "train.yaml"
    bad_yaml.write_text("steps: [1, 2\n")
    assert cli.main([*BASE, "--config", str(bad_yaml)]) == 2
    err = capsys.readouterr().err
    assert f"--config {bad_yaml}:" in err and "not valid YAML" in err and err.count("\n") == 1
    assert cli.main([*BASE, "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: file not found" in capsys.readouterr().err


def test_missing_required_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--method", "vanilla"]) == 2
    assert "missing required option(s): --model, --data, --out" in capsys.readouterr().err


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*BASE, "--steps", "many"])
    assert exit_.value.code == 2 and "--steps" in capsys.readouterr().err


def _fail_with(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    import spf.training.loop

    def boom(cfg):  # stands in for the training loop
        raise exc

    monkeypatch.setattr(spf.training.loop, "train", boom)


def test_an_internal_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    # a ValueError from deep inside spf is a bug, not bad input: it must not read as "spf: error" / exit 2
    _fail_with(monkeypatch, ValueError("shapes (3, 4) and (5,) not aligned"))
    with pytest.raises(ValueError, match="not aligned"):
        cli.main(BASE)
    _fail_with(monkeypatch, FileNotFoundError(2, "No such file or directory", "/internal/cache/x.bin"))
    with pytest.raises(FileNotFoundError):
        cli.main(BASE)


def test_a_value_error_is_the_users_only_when_it_speaks_of_the_command_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fail_with(monkeypatch, ValueError("--steps: more than the data set allows"))  # names a flag of `train`
    assert cli.main(BASE) == 2
    _fail_with(monkeypatch, ValueError("unknown model 'tiny-llama'"))  # quotes a value the user typed
    assert cli.main(BASE) == 2
    assert capsys.readouterr().err.endswith("spf: error: unknown model 'tiny-llama'\n")
    _fail_with(monkeypatch, ValueError("--not-a-train-flag went wrong"))
    with pytest.raises(ValueError, match="not-a-train-flag"):
        cli.main(BASE)


def test_user_and_abort_errors_are_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from spf.data.samples import DataError
    from spf.training.loop import TrainingAborted

    _fail_with(monkeypatch, DataError("d.jsonl:3: invalid JSON"))
    assert cli.main(BASE) == 2
    assert capsys.readouterr().err == "spf: error: d.jsonl:3: invalid JSON\n"
    # the OS reporting a file the user named is the user's problem
    missing = str(tmp_path / "gone.jsonl")
    _fail_with(monkeypatch, FileNotFoundError(2, "No such file or directory", missing))
    assert cli.main([*BASE, "--heldout-safety", missing]) == 2
    _fail_with(monkeypatch, TrainingAborted("non-finite loss", 4, tmp_path / "abort.json"))
    assert cli.main(BASE) == 3
    assert "spf: aborted: non-finite loss at step 4" in capsys.readouterr().err


def test_usage_error_is_a_value_error() -> None:
    # library code that catches ValueError for a bad value keeps catching the CLI's own checks
    assert issubclass(UsageError, ValueError)


# --------------------------------------------------------------------------------------- logging


def test_log_lines_go_through_tqdm_write(monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm

    written: list[str] = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, **kw: written.append(s)))
    handler = cli._TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.emit(logging.LogRecord("spf.x", logging.INFO, __file__, 1, "step %d", (3,), None))
    assert written == ["INFO spf.x: step 3"]
