"""spf.io: the one folder publisher and the shipped-file lookup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spf.data.locate import shipped_file
from spf.io import atomic_dir, atomic_path, current_umask, save_json


def test_atomic_dir_replaces_only_when_complete(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not dest.exists()  # nothing visible until the block ends
    assert (dest / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("crash half-way")
    assert (dest / "a.txt").read_text() == "one"  # the old complete folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind

    with atomic_dir(dest) as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out"):
            pass
    finally:
        os.umask(old)
    # mkdtemp creates 0700; a published stage folder must be readable like any mkdir'd one
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_published_files_and_folders_follow_the_umask(tmp_path: Path, mask: int) -> None:
    """mkstemp/mkdtemp create 0600/0700; what is published must get what open()/mkdir would give, so a
    teammate can read an adapter or a metrics file — and a strict umask must stay strict."""
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        save_json({"a": 1}, tmp_path / "m.json")
        save_json({"a": 2}, tmp_path / "m.json")  # replacing an existing file, too
        with atomic_path(tmp_path / "w.bin") as tmp:
            tmp.unlink()  # a writer that re-creates its output file
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "out") as tmp:
            save_json({"b": 1}, tmp / "inner.json")
        with atomic_dir(tmp_path / "out") as tmp:  # replacing an existing folder
            save_json({"b": 2}, tmp / "inner.json")
    finally:
        os.umask(old)
    for f in ("m.json", "w.bin", "out/inner.json"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~mask, f
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask
    assert os.umask(old) == old  # reading the umask never left it changed


def test_atomic_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"), atomic_dir(tmp_path / "out"):
        pass
    assert (tmp_path / "out").read_text() == "x"


def test_shipped_file_accepts_repo_relative_names() -> None:
    a = shipped_file("refusals.jsonl")
    assert a.is_file() and a == shipped_file("spf/data/refusals.jsonl")


def test_save_json_rejects_before_writing(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    save_json({"a": 1}, target)
    with pytest.raises(TypeError, match="not JSON serialisable"):
        save_json({"a": object()}, target)
    assert target.read_text().strip() == '{\n  "a": 1\n}'
