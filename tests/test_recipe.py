"""Recipes: presets, validation when built, YAML/JSON files, module selection, resolution by name or path."""

import json

import pytest
import yaml

from lowbit.errors import RecipeError
from lowbit.formats import QuantSpec
from lowbit.recipe import PRESETS, CalibrationSpec, Recipe

DOCUMENTED = {
    "w8": QuantSpec(8, -1, True),
    "w4g128": QuantSpec(4, 128, False),
    "w4g64": QuantSpec(4, 64, False),
    "w3g128": QuantSpec(3, 128, False),
    "w2g64": QuantSpec(2, 64, False),
    "gptq-w4g128": QuantSpec(4, 128, False, True),
    "gptq-w3g128": QuantSpec(3, 128, False, True),
    "gptq-w2g64": QuantSpec(2, 64, False, True),
    "awq-w4g128": QuantSpec(4, 128, False),
    "awq-w3g128": QuantSpec(3, 128, False),
    "awq-w2g64": QuantSpec(2, 64, False),
    "ar-w4g128": QuantSpec(4, 128, False, True),
    "ar-w3g128": QuantSpec(3, 128, False, True),
    "ar-w2g64": QuantSpec(2, 64, False, True),
    "ar-w4g128-fast": QuantSpec(4, 128, False, True),
    "ar-w3g128-fast": QuantSpec(3, 128, False, True),
    "ar-w2g64-fast": QuantSpec(2, 64, False, True),
    "best-w4": QuantSpec(4, 128, False, True),
    "best-w3": QuantSpec(3, 128, False, True),
    "best-w2": QuantSpec(2, 64, False, True),
}


# --- presets -----------------------------------------------------------------------------------


def test_presets_are_the_documented_ones():
    assert set(PRESETS) == set(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_preset_builds_with_documented_spec(name):
    r = Recipe.preset(name)
    assert r.name == name
    assert r.spec == DOCUMENTED[name]
    assert (r.bits, r.group_size, r.symmetric) == (DOCUMENTED[name].bits, DOCUMENTED[name].group_size,
                                                   DOCUMENTED[name].symmetric)
    if name.startswith(("gptq-", "awq-", "ar-", "best-")):
        assert r.needs_calibration
        assert (r.calibration.windows, r.calibration.seqlen, r.calibration.corpus) == (128, 512, "owt")
        assert (r.method == "gptq") == name.startswith(("gptq-", "best-"))
        assert (r.scaling == "awq") == name.startswith(("awq-", "best-"))
        assert (r.learned is not None) == name.startswith(("ar-", "best-"))
        if name.startswith("ar-"):
            assert r.learned.iters == (50 if name.endswith("-fast") else 200)
        if name.startswith("best-"):
            assert r.learned.iters == 50 and r.options["clip"] == "output"
    else:
        assert r.method == "rtn" and r.options == {}
        assert not r.needs_calibration
    assert Recipe.resolve(name) == r


# --- validation --------------------------------------------------------------------------------


def test_unknown_key_names_it():
    with pytest.raises(RecipeError, match="group_sise"):
        Recipe.from_dict({"bits": 4, "group_sise": 64})


def test_unknown_calibration_key_names_it():
    with pytest.raises(RecipeError, match="windws"):
        Recipe.from_dict({"calibration": {"windws": 4}})


@pytest.mark.parametrize(("data", "match"), [
    ({"bits": 5}, "bits=5"),
    ({"bits": "4"}, "bits"),
    ({"group_size": 0}, "group_size=0"),
    ({"group_size": 4}, "group_size"),
    ({"group_size": 64.0}, "group_size"),
    ({"symmetric": "yes"}, "symmetric"),
    ({"targets": ["re:("]}, r"re:\("),
    ({"ignore": ["re:("]}, r"re:\("),
    ({"targets": [""]}, "pattern"),
    ({"method": "gptq_typo"}, "gptq_typo"),
    ({"method": "rtn_clip", "options": {"grdi": 3}}, "grdi"),
    ({"method": "rtn_clip", "options": {"grid": "3"}}, "grid"),
    ({"method": "rtn", "options": {"grid": 3}}, "grid"),
    ({"calibration": {"windows": 0}}, "windows"),
])
def test_invalid_recipes_raise(data, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict(data)


def test_unknown_method_lists_known():
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"method": "nope"})
    assert "rtn" in str(e.value) and "rtn_clip" in str(e.value)


def test_not_a_mapping():
    with pytest.raises(RecipeError, match="mapping"):
        Recipe.from_dict(["bits", 4])


def test_options_are_merged_with_defaults():
    r = Recipe.from_dict({"method": "rtn_clip", "bits": 3, "options": {"grid": 8}})
    assert r.options == {"grid": 8, "min_ratio": 0.5, "objective": "weight"}
    assert r.spec == QuantSpec(3, 128, False)


# --- files -------------------------------------------------------------------------------------

FULL = {
    "method": "rtn_clip",
    "bits": 3,
    "group_size": 64,
    "symmetric": True,
    "options": {"grid": 10, "min_ratio": 0.6},
    "targets": ["*.self_attn.*", "re:.*mlp\\.(up|gate)_proj"],
    "ignore": ["*.layers.0.*"],
    "calibration": {"corpus": "wiki", "windows": 16, "seqlen": 256, "seed": 3},
}

YAML_TEXT = """\
method: rtn_clip
bits: 3
group_size: 64
symmetric: true
options: {grid: 10, min_ratio: 0.6}
targets: ["*.self_attn.*", 're:.*mlp\\.(up|gate)_proj']
ignore: ["*.layers.0.*"]
calibration: {corpus: wiki, windows: 16, seqlen: 256, seed: 3}
"""


def test_yaml_text_is_the_dict():
    assert yaml.safe_load(YAML_TEXT) == FULL


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_file_loads(tmp_path, suffix):
    path = tmp_path / f"my_recipe{suffix}"
    path.write_text(YAML_TEXT)
    r = Recipe.from_file(path)
    assert r == Recipe.from_dict(FULL, name="my_recipe")
    assert r.name == "my_recipe"
    assert r.calibration == CalibrationSpec("wiki", 16, 256, 3)
    assert r.targets == ("*.self_attn.*", "re:.*mlp\\.(up|gate)_proj")
    assert Recipe.resolve(str(path)) == r
    assert Recipe.resolve(path) == r


def test_json_file_loads(tmp_path):
    path = tmp_path / "j.json"
    path.write_text(json.dumps(FULL))
    r = Recipe.from_file(path)
    assert r == Recipe.from_dict(FULL, name="j")
    assert Recipe.resolve(str(path)) == r


def test_name_in_file_wins_over_stem(tmp_path):
    path = tmp_path / "stem.yaml"
    path.write_text("name: fancy\nbits: 8\ngroup_size: -1\n")
    r = Recipe.from_file(path)
    assert r.name == "fancy" and r.spec == QuantSpec(8, -1, False)


def test_empty_yaml_is_the_default_recipe(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert Recipe.from_file(path) == Recipe(name="empty")


@pytest.mark.parametrize(("name", "text"), [
    ("bad.yaml", "method: [rtn\nbits: 4\n"),
    ("bad.yaml", "bits: 4\n  group_size: 64\n"),
    ("bad.json", '{"bits": 4,}'),
])
def test_invalid_file_syntax_is_recipe_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RecipeError, match="not valid"):
        Recipe.from_file(path)


def test_yaml_list_is_recipe_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- bits: 4\n")
    with pytest.raises(RecipeError, match="mapping"):
        Recipe.from_file(path)


def test_invalid_values_in_file_are_recipe_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("bits: 5\n")
    with pytest.raises(RecipeError, match="bits=5"):
        Recipe.from_file(path)


def test_missing_file_is_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="cannot read"):
        Recipe.from_file(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError):
        Recipe.resolve(str(tmp_path / "nope.yaml"))


# --- resolve -----------------------------------------------------------------------------------


def test_resolve_unknown_name_lists_presets():
    with pytest.raises(RecipeError, match="w4g129") as e:
        Recipe.resolve("w4g129")
    for name in PRESETS:
        assert name in str(e.value)


def test_resolve_passes_recipes_through():
    r = Recipe(bits=2, group_size=32)
    assert Recipe.resolve(r) is r


# --- selection ---------------------------------------------------------------------------------

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.3.self_attn.q_proj",
    "model.layers.3.self_attn.o_proj",
    "model.layers.3.mlp.up_proj",
    "model.layers.3.mlp.gate_proj",
    "model.layers.3.mlp.down_proj",
    "model.layers.10.mlp.down_proj",
]


def selected(recipe):
    return [n for n in NAMES if recipe.selects(n)]


def test_default_targets_everything():
    assert selected(Recipe()) == NAMES


def test_glob_targets_and_ignore():
    r = Recipe(targets=["*.self_attn.*"], ignore=["*.o_proj"])
    assert selected(r) == ["model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]
    # a glob must match the whole name
    assert not Recipe(targets=["q_proj"]).selects("model.layers.0.self_attn.q_proj")


def test_regex_patterns_fullmatch():
    r = Recipe(targets=["re:.*mlp\\.(up|gate)_proj"])
    assert selected(r) == ["model.layers.3.mlp.up_proj", "model.layers.3.mlp.gate_proj"]
    # fullmatch, not search: a bare fragment selects nothing
    assert selected(Recipe(targets=["re:mlp"])) == []


def test_ignore_takes_precedence_over_targets():
    r = Recipe(targets=["*.mlp.down_proj"], ignore=["re:.*layers\\.0\\..*", "model.layers.10.*"])
    assert selected(r) == ["model.layers.3.mlp.down_proj"]
    # the same name both targeted and ignored is not selected
    assert not Recipe(targets=["model.layers.3.mlp.up_proj"], ignore=["model.layers.3.mlp.up_proj"]).selects(
        "model.layers.3.mlp.up_proj")
    # layer 1 vs layer 10: the regex dot is escaped, so layers.1 does not catch layers.10
    r = Recipe(ignore=["re:model\\.layers\\.1\\..*"])
    assert r.selects("model.layers.10.mlp.down_proj")


def test_string_pattern_becomes_a_list():
    r = Recipe.from_dict({"targets": "*.q_proj", "ignore": "*.layers.0.*"})
    assert r.targets == ("*.q_proj",) and r.ignore == ("*.layers.0.*",)
    assert selected(r) == ["model.layers.3.self_attn.q_proj"]


# --- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [FULL, {}, *PRESETS.values()])
def test_to_dict_round_trips(data):
    r = Recipe.from_dict(data, name="x")
    d = r.to_dict()
    assert Recipe.from_dict(d) == r
    assert json.loads(json.dumps(d)) == d                                  # JSON-able as is
    assert yaml.safe_load(yaml.safe_dump(d)) == d


def test_recipe_is_frozen():
    r = Recipe()
    with pytest.raises(Exception):
        r.bits = 2


def test_calibration_must_be_a_mapping():
    with pytest.raises(RecipeError, match="calibration"):
        Recipe.from_dict({"calibration": "owt"})
