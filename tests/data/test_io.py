"""spf.io: the one folder publisher and the shipped-file lookup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spf.data.locate import shipped_file
from spf.io import OutputError, atomic_dir, atomic_path, check_output, current_umask, output_lock, save_json


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


def test_atomic_path_refuses_a_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="is a folder"), atomic_path(tmp_path / "out"):
        raise AssertionError("never reached")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_lock_is_reentrant_nests_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "out"
    with output_lock(out) as lock:
        assert lock == (tmp_path / "new" / "deeper" / ".out.lock").resolve() and lock.is_file()
        assert f'"pid": {os.getpid()}' in lock.read_text()
        with output_lock(out):  # the same process again (a stage, then the publisher it calls)
            pass
        assert lock.is_file()  # still held by the outer block
        with output_lock(tmp_path / "other"):  # a second output, independent
            pass
    # released: the lock file and the folders created only to hold it are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_stale_lock_file_locks_nothing(tmp_path: Path) -> None:
    stale = tmp_path / ".out.lock"
    stale.write_text('{"pid": 1, "host": "gone", "since": "then", "cmd": "x"}\n')  # a crashed holder's
    with output_lock(tmp_path / "out"):
        assert str(os.getpid()) in stale.read_text()
    assert not stale.exists()


def test_check_output_inputs(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text("{}")
    inputs = {"--model": str(model), "--data": str(data), "--hub": "org/not-a-path", "--none": None}
    for out, how in [(model, "is"), (model / "sub", "lies inside"), (tmp_path, "contains"), (data, "is")]:
        with pytest.raises(OutputError, match=f": {how} the input"):
            check_output(out, inputs=inputs, kind=None)
    check_output(tmp_path / "run", inputs=inputs)  # beside the inputs: fine; a hub id is no path
