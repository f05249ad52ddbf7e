"""AutoML search space: every x-automl metadata form samples inside its bounds, weights are honoured, parents
come first, and keys that cannot change the result are left out of the default search with a reason."""
from __future__ import annotations

import math
from collections import Counter

import optuna
import pytest

from grounding_dino.config import default_spec, load_experiment
from runner.automl.search_space import EXCLUSION_RULES, apply_params, build_search_space, load_train_schema
from sdk.errors import SpecError

optuna.logging.set_verbosity(optuna.logging.WARNING)
SAMPLES = 200


def _leaf(kind, default, **automl):
    return {"type": kind, "default": default, "x-automl": {"enabled": True, **automl}}


# One key per metadata form, nested the way the generated schema nests sections (one through a $ref).
FORMS = {
    "range": _leaf("number", 0.5, valid_min=0.1, valid_max=0.9),
    "log_range": _leaf("number", 1e-4, valid_min=1e-6, valid_max=1e-2, log=True),
    "ordered": _leaf("integer", 4, valid_options=[2, 4, 8, 16]),
    "weighted": _leaf("string", "b", valid_options=["a", "b", "c"], option_weights=[0.7, 0.2, 0.1]),
    "flag": {"type": "boolean", "default": True, "x-automl": {"enabled": True}},
    "multiple": _leaf("integer", 384, valid_min=100, valid_max=400, math_cond="/ 32"),
    "power": _leaf("integer", 64, valid_min=3, valid_max=300, math_cond="^ 2"),
    "child": _leaf("integer", 600, valid_min=384, valid_max=800, math_cond="> s.multiple", depends_on="s.multiple"),
}


def _schema(leaves=FORMS, enabled=None, disabled=()):
    return {
        "type": "object",
        "properties": {"s": {"$ref": "#/$defs/S"}},
        "$defs": {"S": {"type": "object", "properties": dict(leaves)}},
        "automl_default_parameters": [f"s.{k}" for k in (enabled or leaves)],
        "automl_disabled_parameters": list(disabled),
    }


def _spec(leaves=FORMS):
    return {"s": {k: v["default"] for k, v in leaves.items()}, "automl": {"automl_hyperparameters": [], "ranges": {}}}


def _draw(space, n=SAMPLES, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    draws = []
    for _ in range(n):
        trial = study.ask()
        draws.append(space.sample(trial))
        study.tell(trial, 0.0)
    return draws, study


def test_every_metadata_form_stays_in_bounds():
    space = build_search_space(_spec(), _schema())
    draws, study = _draw(space)
    col = {key: [d[f"s.{key}"] for d in draws] for key in FORMS}
    assert all(0.1 <= v <= 0.9 for v in col["range"])
    assert all(1e-6 <= v <= 1e-2 for v in col["log_range"])
    assert set(col["ordered"]) <= {2, 4, 8, 16} and len(set(col["ordered"])) == 4
    assert set(col["flag"]) == {False, True}
    assert all(v % 32 == 0 and 100 <= v <= 400 for v in col["multiple"])
    assert set(col["multiple"]) == {128, 160, 192, 224, 256, 288, 320, 352, 384}
    assert all(v & (v - 1) == 0 and 3 <= v <= 300 for v in col["power"])
    assert set(col["power"]) == {4, 8, 16, 32, 64, 128, 256}
    assert all(384 <= c <= 800 and c > p for c, p in zip(col["child"], col["multiple"]))
    # the log range is sampled log-uniformly: about half the draws fall below the geometric middle 1e-4
    below = sum(v < 1e-4 for v in col["log_range"]) / SAMPLES
    assert 0.4 < below < 0.6, below
    assert study.trials[0].distributions["s.log_range"].log


def test_option_weights_are_honoured_through_one_uniform_distribution():
    space = build_search_space(_spec(), _schema())
    draws, study = _draw(space, seed=1)
    counts = Counter(d["s.weighted"] for d in draws)
    for option, weight in zip("abc", (0.7, 0.2, 0.1)):
        share = counts[option] / SAMPLES
        # 4 standard deviations of a binomial share with 200 draws
        assert abs(share - weight) < 4 * math.sqrt(weight * (1 - weight) / SAMPLES), (option, share)
    # Optuna sees one fixed float distribution, so TPE/GP model it like any other parameter
    distribution = study.trials[0].distributions["s.weighted"]
    assert isinstance(distribution, optuna.distributions.FloatDistribution)
    assert (distribution.low, distribution.high) == (0.0, 1.0)


def test_unweighted_options_are_a_plain_categorical():
    space = build_search_space(_spec(), _schema())
    _, study = _draw(space, n=1)
    assert isinstance(study.trials[0].distributions["s.ordered"], optuna.distributions.CategoricalDistribution)


def test_parents_are_sampled_first_whatever_the_listed_order():
    leaves = {"child": FORMS["child"], "multiple": FORMS["multiple"]}
    space = build_search_space(_spec(leaves), _schema(leaves))
    assert space.keys == ["s.multiple", "s.child"]


def test_parent_outside_the_search_bounds_from_the_spec_value():
    leaves = {"child": FORMS["child"], "multiple": FORMS["multiple"]}
    spec = _spec(leaves)
    spec["s"]["multiple"] = 700
    space = build_search_space(spec, _schema(leaves), requested=["s.child"])
    draws, _ = _draw(space, n=50)
    assert all(701 <= d["s.child"] <= 800 for d in draws)
    spec["s"]["multiple"] = 799  # a strict bound on integers leaves exactly one value
    draws, _ = _draw(build_search_space(spec, _schema(leaves), requested=["s.child"]), n=5)
    assert {d["s.child"] for d in draws} == {800}


def test_impossible_bound_fails_when_the_space_is_built():
    leaves = dict(FORMS, child=_leaf("integer", 300, valid_min=200, valid_max=300, math_cond="> s.multiple",
                                     depends_on="s.multiple"))
    with pytest.raises(SpecError, match=r"s\.child.*no value is > s\.multiple"):
        build_search_space(_spec(leaves), _schema(leaves))


@pytest.mark.parametrize("meta, message", [
    ({"math_cond": "% 3"}, "math_cond '% 3' is not understood"),
    ({"math_cond": "> s.range", "depends_on": "s.flag"}, "depends_on names s.flag"),
    ({"valid_options": ["x", "y"], "option_weights": [1.0]}, "one non-negative weight per option"),
])
def test_bad_metadata_is_named(meta, message):
    leaves = dict(FORMS, bad=_leaf("integer", 5, valid_min=1, valid_max=9, **meta))
    with pytest.raises(SpecError, match=message):
        build_search_space(_spec(leaves), _schema(leaves))


def test_missing_bounds_follow_tao_rules():
    leaves = {
        "open_max": {"type": "number", "default": 0.3, "minimum": 0.0, "x-automl": {"enabled": True}},
        "no_range": {"type": "number", "default": 2.0, "x-automl": {"enabled": True}},
    }
    space = {p.key: p for p in build_search_space(_spec(leaves), _schema(leaves)).params}
    # an unbounded max is replaced by the spec's value; no range at all is [value/10, value*10] (log: ratio 100)
    assert (space["s.open_max"].low, space["s.open_max"].high) == (0.0, 0.3)
    assert (space["s.no_range"].low, space["s.no_range"].high, space["s.no_range"].log) == (0.2, 20.0, True)


def test_requested_key_errors_name_the_list_entry():
    spec = _spec()
    with pytest.raises(SpecError, match=r"automl\.automl_hyperparameters\[1\].*not a key of the train spec"):
        build_search_space(spec, _schema(), requested=["s.range", "s.nope"])
    leaves = dict(FORMS, name={"type": "string", "default": "x"})
    with pytest.raises(SpecError, match="a string key without options cannot be searched"):
        build_search_space(_spec(leaves), _schema(leaves), requested=["s.name"])


# ------------------------------------------------------------------------------------------------ the real schema
def test_default_space_of_the_train_schema_leaves_out_keys_that_cannot_matter():
    space = build_search_space(default_spec(), load_train_schema())
    excluded = dict(space.excluded)
    assert "AdamW" in excluded["train.optim.momentum"]
    assert "StepLR" in excluded["train.optim.lr_step_size"]
    assert "never decays" in excluded["train.optim.lr_decay"]  # lr_steps [10] with 10 epochs
    assert "post-processing" in excluded["model.num_select"]
    assert "structural" in excluded["model.enc_layers"] and "structural" in excluded["model.dec_layers"]
    assert set(space.keys) == {
        "train.optim.lr", "train.optim.lr_backbone", "train.optim.lr_linear_proj_mult", "train.optim.weight_decay",
        "dataset.augmentation.horizontal_flip_prob", "dataset.augmentation.train_random_crop_min",
        "dataset.augmentation.train_random_crop_max",
    }
    assert not set(space.keys) & set(excluded)
    assert set(excluded) <= set(EXCLUSION_RULES)


def test_a_structural_key_made_searchable_is_left_out_of_the_default_search():
    schema = load_train_schema()
    hidden = schema["properties"]["model"]["properties"]["hidden_dim"]
    assert hidden["x-structural"] is True and "x-automl" not in hidden
    hidden["x-automl"] = {"enabled": True, "valid_options": [128, 256]}
    schema["automl_default_parameters"].append("model.hidden_dim")
    space = build_search_space(default_spec(), schema)
    assert "model.hidden_dim" not in space.keys
    assert dict(space.excluded)["model.hidden_dim"].startswith("structural:")


def test_the_rules_follow_the_spec():
    spec = default_spec()
    spec["train"]["optim"]["lr_scheduler"] = "StepLR"
    spec["train"]["optim"]["lr_steps"] = [4]
    keys = build_search_space(spec, load_train_schema()).keys
    assert "train.optim.lr_step_size" in keys and "train.optim.lr_decay" in keys
    spec["train"]["optim"]["lr_scheduler"] = "MultiStep"
    keys = build_search_space(spec, load_train_schema()).keys
    assert "train.optim.lr_decay" in keys and "train.optim.lr_step_size" not in keys


def test_an_explicit_request_searches_an_excluded_key_and_says_why_it_may_not_matter():
    spec = default_spec()
    spec["automl"]["automl_hyperparameters"] = ["train.optim.momentum", "model.enc_layers"]
    space = build_search_space(spec, load_train_schema())
    assert space.keys == ["train.optim.momentum", "model.enc_layers"] and not space.excluded
    assert any("momentum" in note and "AdamW" in note for note in space.notes)


def test_sampled_trial_specs_are_valid_specs_within_schema_bounds():
    schema = load_train_schema()
    space = build_search_space(default_spec(), schema)
    draws, _ = _draw(space, n=50, seed=3)
    for values in draws:
        spec = apply_params(default_spec(), values)
        load_experiment(spec)  # every key still fits the dataclasses
        aug = spec["dataset"]["augmentation"]
        assert aug["train_random_crop_min"] % 32 == 0 and aug["train_random_crop_max"] > aug["train_random_crop_min"]
        assert 1e-5 <= spec["train"]["optim"]["lr"] <= 1e-3
    assert default_spec()["train"]["optim"]["lr"] == 2e-4  # apply_params copies, never mutates


def test_spec_point_maps_each_form_back_to_the_spec_value():
    space = build_search_space(_spec(), _schema())
    point = space.spec_point(_spec())
    assert set(point) == {f"s.{k}" for k in FORMS}
    study = optuna.create_study()
    study.enqueue_trial(point)
    trial = study.ask()
    assert space.sample(trial) == {f"s.{k}": v["default"] for k, v in FORMS.items()}  # weighted "b" included


def test_spec_point_leaves_values_outside_the_space_to_the_sampler():
    spec = _spec()
    spec["s"].update(range=2.0, multiple=390, power=48, weighted="z", child=384)  # child is not > multiple (384)
    space = build_search_space(spec, _schema())
    assert set(space.spec_point(spec)) == {"s.log_range", "s.ordered", "s.flag"}


def test_automl_ranges_replace_the_schema_range_and_are_checked():
    spec = default_spec()
    spec["automl"].update(automl_hyperparameters=["train.optim.lr", "train.optim.lr_backbone"],
                          ranges={"train.optim.lr_backbone": [1e-5, 3e-4]})
    space = build_search_space(spec, load_train_schema())
    draws, _ = _draw(space, n=SAMPLES)
    backbone = [d["train.optim.lr_backbone"] for d in draws]
    assert 1e-5 <= min(backbone) and max(backbone) <= 3e-4 and max(backbone) > 1e-4  # beyond the schema's 1e-4
    assert all(1e-5 <= d["train.optim.lr"] <= 1e-3 for d in draws)  # the other key keeps the schema's range
    assert "1e-05" in space.params[1].describe() and "0.0003" in space.params[1].describe()
    spec["train"]["optim"]["lr_backbone"] = 2e-4
    assert space.spec_point(spec)["train.optim.lr_backbone"] == 2e-4  # inside the given range: trial 0 runs it

    def error(ranges):
        spec["automl"]["ranges"] = ranges
        with pytest.raises(SpecError) as err:
            build_search_space(spec, load_train_schema())
        return str(err.value)

    assert "not searched" in error({"train.optim.momentum": [0.8, 0.9]})
    assert "min < max" in error({"train.optim.lr": [1e-3, 1e-4]})
    assert "min < max" in error({"train.optim.lr": [1e-4]})
    assert "must be > 0" in error({"train.optim.lr": [-1.0, 1e-3]})
    spec["automl"]["automl_hyperparameters"] = ["train.optim.optimizer"]
    assert "only numeric keys take a range" in error({"train.optim.optimizer": [0, 1]})
