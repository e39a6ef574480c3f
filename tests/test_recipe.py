from __future__ import annotations

import pytest

import edgetrain as et


def test_recipe_round_trips_through_files(tmp_path):
    r = et.Recipe([et.Freeze(last_k_blocks=1, targets=["features.0.*"]), et.Checkpoint()], name="mix",
                  targets=["features.*"])
    for suffix in (".json", ".yaml"):
        path = r.save(tmp_path / f"r{suffix}")
        assert et.Recipe.load(path) == r
    assert r.technique_names == ["freeze", "checkpoint"]


def test_targets_accept_a_single_glob_and_become_tuples():
    assert et.Freeze(targets="a.*").targets == ("a.*",)
    assert et.Recipe(et.Checkpoint(), name="c").techniques == (et.Checkpoint(),)


@pytest.mark.parametrize("text,match", [
    ('{"techniques": [{"type": "nope"}]}', "unknown technique 'nope'"),
    ('{"techniques": [{"type": "freeze", "last_k_blocks": -1}]}', "Freeze.last_k_blocks"),
    ('{"techniques": [{"type": "freeze", "classifier": "yes"}]}', "Freeze.classifier"),
    ('{"techniques": [{"last_k_blocks": 1}]}', "'type' key"),
    ('{"techniques": {"type": "freeze"}}', "must be a list"),
    ('{"name": "x", "bogus": 1}', "unknown key"),
    ('[1, 2]', "must be a mapping"),
    ('{"techniques": [', "malformed"),
    ('{"techniques": [{"type": "freeze", "targets": [3]}]}', "targets"),
])
def test_bad_recipes_give_one_line_errors(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(et.ConfigError, match=match) as e:
        et.Recipe.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    (tmp_path / "r.yaml").write_text("techniques: [\n  - {type: freeze")
    with pytest.raises(et.ConfigError, match="malformed"):
        et.Recipe.load(tmp_path / "r.yaml")
    with pytest.raises(et.ConfigError, match="cannot read recipe"):
        et.Recipe.load(tmp_path / "missing.json")


def test_a_binary_file_as_a_recipe_is_one_line(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"PK\x03\x04\xff\xfe binary")
    with pytest.raises(et.ConfigError, match="not UTF-8 text") as e:
        et.Recipe.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
