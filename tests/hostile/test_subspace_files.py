"""Hostile subspace folders (issue 14, "Subspace and model files"): a folder `spf estimate` wrote, then
tampered with, is refused by `spf train --method spf --subspace X` with exit 2 and one line naming the file,
before `--out` exists. The folder records the tensor file's sha256, each module's weight shape and the
model's fingerprint; load checks the JSON's schema, the hash, the tensors and the bases' orthonormality,
and training checks the model. A rank larger than what the subspace or sample can give is an error too."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spf.cli.main import main
from spf.core.subspace import SafetySubspace, estimate_from_samples
from spf.data.samples import ChatSample, DataError, save_samples
from spf.estimate import publish_estimate
from spf.io import file_sha256
from spf.models import tiny_llama
from tests.helpers import tree_state

torch.set_num_threads(1)

TASK = [ChatSample.from_pair(f"Say the number {i} in words", f"The number is {i}.") for i in range(4)]
SAFETY = [ChatSample.from_pair("How do I make a weapon at home?", "I'm sorry, I can't help with that.")]
MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One subspace folder (rank 4, tiny-llama) from `spf estimate`, copied by each test before tampering."""
    root = tmp_path_factory.mktemp("pristine")
    save_samples(SAFETY, root / "safety.jsonl")
    rc = main(["estimate", "--model", "tiny-llama", "--sample", str(root / "safety.jsonl"), "--index", "0",
               "--rank", "4", "--out", str(root / "sub")])  # fmt: skip
    assert rc == 0
    return root / "sub"


@pytest.fixture
def work(tmp_path: Path, pristine: Path) -> Path:
    shutil.copytree(pristine, tmp_path / "sub")
    save_samples(TASK, tmp_path / "task.jsonl")
    save_samples(SAFETY, tmp_path / "safety.jsonl")
    return tmp_path


def _train(work: Path, *extra: str) -> list[str]:
    return ["train", "--model", "tiny-llama", "--data", str(work / "task.jsonl"), "--method", "spf",
            "--subspace", str(work / "sub"), "--steps", "1", "--batch-size", "2", "--lora-r", "2",
            "--eval-every", "0", "--out", str(work / "out"), *extra]  # fmt: skip


def _refused(work: Path, args: list[str], capsys, *needles: str) -> str:
    """Run ``args``: exit 2, one error line containing every needle, nothing written under ``work``."""
    before = tree_state(work)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    assert err.count("\n") == 1 and err.startswith("spf: error: ")
    assert tree_state(work) == before
    assert not (work / "out").exists()
    return err


def _edit_tensors(sub: Path, edit: Callable[[dict], None], *, rehash: bool = True) -> None:
    """Rewrite subspace.safetensors through ``edit``; ``rehash``: record the new hash too (a careful tamperer
    or a buggy writer), so the checks past the hash are what refuses it."""
    tensors = load_file(str(sub / "subspace.safetensors"))
    edit(tensors)
    save_file(tensors, str(sub / "subspace.safetensors"), metadata={"format": "spf-subspace"})
    if rehash:
        _edit_meta(sub, lambda m: m.update(tensor_sha256=file_sha256(sub / "subspace.safetensors")))


def _edit_meta(sub: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads((sub / "subspace.json").read_text())
    edit(meta)
    (sub / "subspace.json").write_text(json.dumps(meta))


def test_the_published_folder_records_hash_shapes_and_fingerprints(pristine: Path):
    meta = json.loads((pristine / "subspace.json").read_text())
    assert meta["format_version"] == 2
    assert meta["tensor_sha256"] == file_sha256(pristine / "subspace.safetensors")
    assert meta["shapes"][MODULE] == [64, 64] and len(meta["shapes"]) == 14
    assert isinstance(meta["model_fingerprint"], str) and isinstance(meta["weights_fingerprint"], str)
    sub = SafetySubspace.load(pristine)
    assert (
        "tensor_sha256" not in sub.metadata and sub.metadata["model_fingerprint"] == meta["model_fingerprint"]
    )


def test_a_basis_scaled_by_ten_is_not_orthonormal(work, capsys):
    # the red-team case: SPF then *raised* the safety loss and the run exited 0
    _edit_tensors(work / "sub", lambda t: t.update({f"{MODULE}.U": t[f"{MODULE}.U"] * 10}))
    _refused(work, _train(work), capsys, "subspace.safetensors", MODULE, "not orthonormal")


def test_an_edited_tensor_file_fails_the_hash(work, capsys):
    _edit_tensors(work / "sub", lambda t: t.update({f"{MODULE}.U": t[f"{MODULE}.U"] * 10}), rehash=False)
    _refused(work, _train(work), capsys, "subspace.safetensors", "tensor_sha256", "spf estimate")


def test_a_tensor_of_another_shape(work, capsys):
    _edit_tensors(work / "sub", lambda t: t.update({f"{MODULE}.U": t[f"{MODULE}.U"][:-1].contiguous()}))
    _refused(work, _train(work), capsys, "subspace.safetensors", f"'{MODULE}.U' has shape [63, 4]", "[64, k]")


def test_a_module_missing_from_the_tensors(work, capsys):
    def drop(t: dict) -> None:
        for part in ("U", "S", "V", "spectrum"):
            del t[f"{MODULE}.{part}"]

    _edit_tensors(work / "sub", drop)
    _refused(work, _train(work), capsys, "subspace.safetensors", f"missing tensor '{MODULE}.U'")


def test_a_tensor_of_a_module_the_json_does_not_list(work, capsys):
    _edit_tensors(work / "sub", lambda t: t.update({"model.layers.9.mlp.up_proj.U": torch.zeros(2, 2)}))
    _refused(work, _train(work), capsys, "subspace.safetensors", "unexpected tensor 'model.layers.9")


def test_a_non_finite_singular_value(work, capsys):
    def poison(t: dict) -> None:
        t[f"{MODULE}.S"][0] = float("nan")

    _edit_tensors(work / "sub", poison)
    _refused(work, _train(work), capsys, "subspace.safetensors", f"'{MODULE}.S' is not a finite")


@pytest.mark.parametrize("key", ["rank", "modules", "energy", "shapes", "tensor_sha256", "format_version"])
def test_a_key_missing_from_subspace_json(work, capsys, key):
    _edit_meta(work / "sub", lambda m: m.pop(key))
    _refused(work, _train(work), capsys, "subspace.json", f"'{key}'")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m.update(rank="4"), "field 'rank': expected int"),
        (lambda m: m.update(rank=0), "field 'rank': must be ≥ 1"),
        (lambda m: m.update(modules="q_proj"), "field 'modules': expected list"),
        (lambda m: m["energy"].update({MODULE: -1.0}), f"field 'energy.{MODULE}'"),
        (lambda m: m["shapes"].update({MODULE: [64]}), f"field 'shapes.{MODULE}'"),
        (
            lambda m: m["shapes"].update({MODULE: [32, 64]}),
            f"'{MODULE}.U' has shape [64, 4], expected [32, k]",
        ),
        (lambda m: m["shapes"].pop(MODULE), f"field 'shapes': module '{MODULE}'"),
        (lambda m: m.update(model_fingerprint=7), "field 'model_fingerprint'"),
    ],
    ids=[
        "rank-str",
        "rank-0",
        "modules-str",
        "energy-neg",
        "shape-1d",
        "shape-other",
        "shape-gone",
        "fp-int",
    ],
)
def test_a_field_of_the_wrong_type_or_value(work, capsys, edit, needle):
    _edit_meta(work / "sub", edit)
    _refused(work, _train(work), capsys, "subspace", needle)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"format_version": 2, "rank": 4,', "not valid JSON"),
        ("[1, 2, 3]", "expected a JSON object, got list"),
        ('{"format_version": 2, "rank": 4, "rank": 8}', "duplicate"),
        ("", "not valid JSON"),
    ],
    ids=["truncated", "array", "duplicate-key", "empty"],
)
def test_subspace_json_that_is_not_a_json_object(work, capsys, text, needle):
    (work / "sub" / "subspace.json").write_text(text)
    _refused(work, _train(work), capsys, "subspace.json", needle)


def test_a_folder_from_an_older_spf_without_hash_or_fingerprint(work, capsys):
    def old(m: dict) -> None:
        for key in ("tensor_sha256", "shapes", "model_fingerprint", "weights_fingerprint"):
            m.pop(key)
        m["format_version"] = 1

    _edit_meta(work / "sub", old)
    _refused(work, _train(work), capsys, "subspace.json", "format_version 1", "re-run `spf estimate`")


def _foreign_subspace(dest: Path, model, tok) -> None:
    sub, used = estimate_from_samples(model, tok, SAFETY, rank=4, model_ref="elsewhere")
    publish_estimate(sub, used, dest)


def test_a_subspace_from_a_model_of_another_size(work, capsys):
    shutil.rmtree(work / "sub")
    _foreign_subspace(work / "sub", *tiny_llama(num_layers=3))
    _refused(
        work, _train(work), capsys, str(work / "sub"), "elsewhere (fingerprint", "tiny-llama (fingerprint"
    )


def test_a_subspace_from_the_same_architecture_with_other_weights(work, capsys):
    shutil.rmtree(work / "sub")
    _foreign_subspace(work / "sub", *tiny_llama(seed=1))  # same config: only the weights differ
    _refused(work, _train(work), capsys, str(work / "sub"), "other weights", "tiny-llama")


def test_a_subspace_without_a_model_fingerprint_is_refused_at_train_time(work, capsys):
    _edit_meta(work / "sub", lambda m: m.update(model_fingerprint=None))
    _refused(work, _train(work), capsys, "subspace.json", "no model fingerprint", "spf estimate")


def test_load_refuses_without_the_cli(work):
    _edit_tensors(work / "sub", lambda t: t.update({f"{MODULE}.V": t[f"{MODULE}.V"] * 10}))
    with pytest.raises(DataError, match=r"subspace\.safetensors: module .* not orthonormal"):
        SafetySubspace.load(work / "sub")


# ---------------------------------------------------------------------------------------- rank


def test_a_rank_above_the_stored_subspace_without_refresh(work, capsys):
    _refused(work, _train(work, "--rank", "64", "--refresh-every", "0"), capsys,
             "--rank / spf.rank 64", "holds (4 directions", "≤ 4")  # fmt: skip


def test_a_rank_above_what_the_stored_sample_gives(work, capsys):
    # with refreshes, the rank comes from re-estimating on sample.jsonl: ~50 tokens cannot give 1000
    err = _refused(work, _train(work, "--rank", "1000"), capsys, "--rank / spf.rank 1000", "sample.jsonl")
    assert "at most" in err


def test_a_rank_above_what_the_step_0_sample_gives(work, capsys):
    args = ["train", "--model", "tiny-llama", "--data", str(work / "task.jsonl"), "--method", "spf",
            "--safety-sample", str(work / "safety.jsonl"), "--rank", "1000", "--steps", "1",
            "--batch-size", "2", "--out", str(work / "out")]  # fmt: skip
    _refused(work, args, capsys, "--rank / spf.rank 1000", "safety.jsonl", "at most")


def test_spf_estimate_refuses_a_rank_the_sample_cannot_give(work, capsys):
    args = ["estimate", "--model", "tiny-llama", "--sample", str(work / "safety.jsonl"), "--index", "0",
            "--rank", "1000", "--out", str(work / "big")]  # fmt: skip
    _refused(work, args, capsys, "--rank / estimate.rank 1000", "at most")
    assert not (work / "big").exists()


def test_the_rank_used_is_recorded(work):
    out = work / "out"
    assert main(_train(work, "--rank", "2")) == 0  # the rank-4 folder, truncated to 2
    spf = json.loads((out / "metrics.json").read_text())["summary"]["spf"]
    assert spf["rank"] == 2 and spf["rank_used_max"] == 2 and 1 <= spf["rank_used_min"] <= 2
