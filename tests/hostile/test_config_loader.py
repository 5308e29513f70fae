"""spf.loaders on its own: each shape PyYAML / json would accept silently is refused, naming file and line."""

from __future__ import annotations

import time

import pytest

from spf.loaders import ConfigFileError, load_config_file, load_json_text, load_yaml_file, load_yaml_text

BOMB = (
    'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: 1\nb: 2\na: 3\n", "p.yaml:3: duplicate key 'a' (first at line 1)"),
        ("s:\n  k: 1\n  k: 2\n", "p.yaml:3: duplicate key 'k'"),
        ("x: &v 1\ny: *v\n", "p.yaml:1: YAML anchors (&v) are not allowed"),
        ("<<: {a: 1}\n", "p.yaml:1: YAML merge keys (<<) are not allowed"),
        ("", "p.yaml: empty document"),
        ("# only a comment\n", "p.yaml: empty document"),
        ("a: 1\n---\nb: 2\n", "p.yaml:2: not valid YAML"),
        ("a: [1\n", "p.yaml:2: not valid YAML"),
        ("a: " + "9" * 5000 + "\n", "p.yaml: a value cannot be read"),
        ("[" * 50_000, "p.yaml: nested too deeply"),
    ],
)
def test_yaml_shapes_that_change_meaning_are_refused(text, expected):
    with pytest.raises(ConfigFileError) as err:
        load_yaml_text(text, "p.yaml")
    assert str(err.value).startswith(expected), err.value
    assert len(str(err.value)) < 200 and "\n" not in str(err.value)


def test_an_alias_bomb_is_refused_at_once_without_expanding():
    t0 = time.perf_counter()
    with pytest.raises(ConfigFileError, match=r"^bomb.yaml:1: YAML anchors"):
        load_yaml_text(BOMB, "bomb.yaml")
    assert time.perf_counter() - t0 < 1.0


def test_plain_yaml_reads_and_empty_is_allowed_only_when_asked():
    assert load_yaml_text("a: 1\nb: [1, {c: x}]\n") == {"a": 1, "b": [1, {"c": "x"}]}
    assert load_yaml_text("# nothing\n", allow_empty=True) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1, "a": 2}', "f.json: duplicate key 'a'"),
        ('{"s": {"k": 1, "k": 2}}', "f.json: duplicate key 'k'"),
        ('{"a": NaN}', "f.json: NaN is not valid JSON"),
        ('{"a": Infinity}', "f.json: Infinity is not valid JSON"),
        ('{"a": 1,\n "b": }', "f.json:2: not valid JSON"),
    ],
)
def test_json_duplicates_and_non_standard_constants_are_refused(text, expected):
    with pytest.raises(ConfigFileError) as err:
        load_json_text(text, "f.json")
    assert str(err.value).startswith(expected), err.value


def test_files_a_folder_a_non_utf8_file_and_an_oversized_file(tmp_path, monkeypatch):
    with pytest.raises(ConfigFileError, match="is a folder"):
        load_yaml_file(tmp_path)
    utf16 = tmp_path / "u.yaml"
    utf16.write_bytes("a: 1\n".encode("utf-16-le"))
    with pytest.raises(ConfigFileError, match=r"not UTF-8.*UTF-16"):
        load_yaml_file(utf16)
    big = tmp_path / "big.json"
    big.write_text("[" + "1," * 600_000 + "1]")
    with pytest.raises(ConfigFileError, match="bytes; a config file is at most"):
        load_config_file(big)
    with pytest.raises(ConfigFileError, match="file not found"):
        load_config_file(tmp_path / "absent.yaml")
    ok = tmp_path / "c.yml"
    ok.write_text("steps: 3\n")
    assert load_config_file(ok) == {"steps": 3}
