"""Recipe schema, YAML errors with field paths, --set overrides and the recipe commands."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from kdcli.errors import KdcliError
from kdcli.training.recipe import RecipeError, builtin_names, load_recipe

MINIMAL = {"stages": [{"name": "kd", "epochs": 2, "losses": [{"method": "kd"}]}]}


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def problem(tmp_path, data) -> str:
    with pytest.raises(KdcliError) as err:
        load_recipe(str(write(tmp_path, data)))
    return str(err.value)


def test_builtins_load_and_default_is_joint():
    assert {"kd-anchored", "supervised", "smskd"} <= set(builtin_names())
    default = load_recipe(None)
    assert default.name == "joint"
    assert [[loss.method for loss in s.losses] for s in default.stages] == [["kd", "fitnets", "rkd"]]
    smskd = load_recipe("smskd")
    assert smskd.stages[0].anchor.weighting == "none"
    assert all(s.anchor.weighting == "tcp" for s in smskd.stages[1:])


def test_stage_optimizer_inherits_and_overrides(tmp_path):
    data = {**MINIMAL, "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.8},
            "stages": [{**MINIMAL["stages"][0], "optimizer": {"lr": 0.01}}, {**MINIMAL["stages"][0], "name": "b"}]}
    recipe = load_recipe(str(write(tmp_path, data)))
    first, second = recipe.stages
    assert (first.optimizer.lr, first.optimizer.momentum) == (0.01, 0.8)
    assert (second.optimizer.lr, second.optimizer.momentum) == (0.2, 0.8)


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda r: r["stages"][0].update(epochz=3), "stages.0.epochz: unknown key (did you mean epochs?)"),
        (lambda r: r["stages"][0].update(epochs="many"), "stages.0.epochs: input should be a valid integer"),
        (lambda r: r["stages"][0].update(epochs=-1), "stages.0.epochs: input should be greater than or equal to 1"),
        (lambda r: r.update(stages=[]), "stages: list should have at least 1 item"),
        (lambda r: r["stages"][0]["losses"][0].update(method="fitnet"), "unknown method 'fitnet'"),
        (lambda r: r["stages"][0].update(anchor={"weighting": "tcpp"}), "stages.0.anchor.weighting: got 'tcpp'; allowed: 'none', 'fixed' or 'tcp'"),
        (lambda r: r["stages"][0]["losses"][0].update(temprature=2), "stages.0.losses.0.temprature: unknown key (did you mean temperature?)"),
        (lambda r: r.pop("stages"), "stages: required key missing"),
        (lambda r: r["stages"].append(dict(r["stages"][0])), "stage names must be unique; repeated: kd"),
    ],
)
def test_recipe_errors_name_the_field(tmp_path, mutate, expected):
    data = json.loads(json.dumps(MINIMAL))
    mutate(data)
    assert expected in problem(tmp_path, data)


def test_unknown_method_lists_available(tmp_path):
    data = json.loads(json.dumps(MINIMAL))
    data["stages"][0]["losses"][0]["method"] = "kdd"
    message = problem(tmp_path, data)
    assert "did you mean kd, " in message and "available: ce, kd, dkd, kd_std, fitnets, at, rkd, sp, pkt" in message


def test_yaml_syntax_error_gives_the_line(tmp_path):
    assert "not valid YAML at line 2" in problem(tmp_path, "stages:\n  - name: a: b\n")


def test_all_problems_are_collected(tmp_path):
    data = {"stages": [{"name": "a", "epochs": 0, "losses": [{"method": "kd", "alpha": 3}]}]}
    with pytest.raises(RecipeError) as err:
        load_recipe(str(write(tmp_path, data)))
    assert len(err.value.problems) == 2 and "+1 more" in str(err.value)


def test_set_overrides_before_validation():
    recipe = load_recipe("kd-anchored", ["stages.0.epochs=1", "stages.1.anchor.weighting=fixed",
                                         "stages.1.anchor.lambda=0.5", "data.mean=[0.1, 0.2, 0.3]"], seed=7)
    assert recipe.stages[0].epochs == 1 and recipe.seed == 7
    assert recipe.stages[1].anchor.weighting == "fixed" and recipe.stages[1].anchor.lambda_ == 0.5
    assert recipe.data.mean == (0.1, 0.2, 0.3)


@pytest.mark.parametrize(
    "assignment,expected",
    [
        ("stages.9.epochs=1", "stages has 2 entries, so '9' must be an index 0..1"),
        ("stages.0.epoch=1", "'epoch' is not a key of stages.0 (did you mean epochs?)"),
        ("nonsense=1", "'nonsense' is not a key of the recipe"),
        ("stages.0.epochs.x=1", "is a single value"),
        ("stages.0.epochs", "expected key=value"),
        ("stages.0.anchor.weighting=sometimes", "allowed: 'none', 'fixed' or 'tcp'"),
    ],
)
def test_set_errors(assignment, expected):
    with pytest.raises(KdcliError) as err:
        load_recipe("kd-anchored", [assignment])
    assert expected in str(err.value)


def test_unknown_recipe_name_suggests():
    with pytest.raises(KdcliError) as err:
        load_recipe("kd-anchor")
    assert "did you mean kd-anchored?" in str(err.value)


def test_recipe_commands(cli, tmp_path):
    shown = cli("recipe", "show", "kd-anchored", "--set", "stages.0.epochs=2")
    assert shown.code == 0 and yaml.safe_load(shown.out)["stages"][0]["epochs"] == 2
    schema = cli("recipe", "schema")
    assert schema.code == 0
    for name in builtin_names():
        # what `recipe show` prints is valid against what `recipe schema` prints
        jsonschema.validate(yaml.safe_load(cli("recipe", "show", name).out), schema.json())
    good = cli("recipe", "validate", "kd-anchored", str(write(tmp_path, MINIMAL)))
    assert good.code == 0 and good.out.count("ok:") == 2
    bad = json.loads(json.dumps(MINIMAL))
    bad["stages"][0].update(epochs=0, anchor={"weighting": "x"})
    result = cli("recipe", "validate", str(write(tmp_path, bad, "bad.yaml")))
    assert result.code == 2 and result.err.count("error:") == 2
    assert cli("recipe", "list").out.count("kd-anchored") == 1
