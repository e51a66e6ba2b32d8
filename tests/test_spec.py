"""AdapterSpec: validation, YAML round trip, variants."""

import pytest

from kdinpaint.spec import AdapterSpec, load_spec


def test_plain_dict_is_a_complete_spec():
    spec = load_spec({"encoder_levels": ["a", "b"]})
    assert spec.sites == ["a", "b"] and spec.teacher_paths == ["a", "b"]
    assert spec.mask_arg == "mask" and spec.teacher_input == "empty_mask"


def test_yaml_round_trip(tmp_path):
    spec = AdapterSpec(
        name="x",
        encoder_levels=["enc.*"],
        completion_sites=[],
        attention_sites=[{"module": "dec.att", "affinity": "softmax", "layout": "keys_hw"}],
        variants={"star": {"completion_sites": ["enc.1"], "meta": {"mode": "frozen"}}},
    )
    path = tmp_path / "spec.yaml"
    spec.to_yaml(path)
    again = load_spec(str(path))
    assert again == spec
    star = again.variant("star")
    assert star.name == "x:star" and star.sites == ["enc.1"] and star.meta.mode == "frozen"
    assert star.meta.steps == 2  # nested overrides merge


def test_unknown_keys_and_wrong_types_are_named():
    with pytest.raises(ValueError, match="encoder_level.*valid keys"):
        AdapterSpec.from_dict({"encoder_level": ["a"]})
    with pytest.raises(TypeError, match="encoder_levels"):
        AdapterSpec.from_dict({"encoder_levels": [1, 2]})
    with pytest.raises(ValueError, match="teacher_input"):
        AdapterSpec.from_dict({"teacher_input": "gt"})
    with pytest.raises(ValueError, match="meta.mode .* not one of"):
        AdapterSpec.from_dict({"meta": {"mode": "reversehg"}})
    with pytest.raises(ValueError, match="valid keys"):
        AdapterSpec.from_dict({"completion": {"kernel": 3}})
    with pytest.raises(ValueError, match="no variant 'nope'"):
        AdapterSpec().variant("nope")
    with pytest.raises(ValueError, match="overrides unknown"):
        AdapterSpec(variants={"v": {"levels": []}})


def test_missing_spec_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_spec(str(tmp_path / "missing.yaml"))
