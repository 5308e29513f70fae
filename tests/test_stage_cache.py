"""The Prefect stage cache key: content hashes of parameters and inputs; reuse only a matching output."""

from __future__ import annotations

from pathlib import Path

from spf.params import PipelineParams
from tasks.stages import STAMP, input_key, output_matches


def _params(tmp_path: Path, **finetune) -> dict:
    p = PipelineParams().to_dict()
    p["runtime"]["workdir"] = str(tmp_path / "outputs")
    p["finetune"].update(finetune)
    return p


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_input_key_follows_its_own_section_and_input_bytes(tmp_path):
    out = tmp_path / "outputs"
    for name in ("aligned", "data", "subspace"):
        _write(out / name / "x.bin", name)
    base = input_key("finetune", _params(tmp_path))
    assert input_key("finetune", _params(tmp_path)) == base  # deterministic
    assert input_key("finetune", _params(tmp_path, steps=7)) != base  # its parameter section
    other = _params(tmp_path)
    other["gate"]["max_harmful_rate"] = 0.5  # a section it does not read
    assert input_key("finetune", other) == base
    _write(out / "subspace" / "x.bin", "changed")  # the bytes of an input
    assert input_key("finetune", _params(tmp_path)) != base
    assert input_key("prepare", _params(tmp_path)) == input_key("prepare", _params(tmp_path, steps=9))


def test_cached_output_is_reused_only_while_its_stamp_matches(tmp_path):
    p = _params(tmp_path)
    key = input_key("prepare", p)
    data = tmp_path / "outputs" / "data"
    assert not output_matches("prepare", p, key)  # nothing on disk: run
    _write(data / STAMP, key + "\n")
    assert output_matches("prepare", p, key)
    # another run with other parameters overwrote the output: its stamp no longer matches
    p2 = _params(tmp_path)
    p2["prepare"]["n"] = 7
    _write(data / STAMP, input_key("prepare", p2) + "\n")
    assert not output_matches("prepare", p, key)
