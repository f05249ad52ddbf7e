"""Spec handling: overrides, shorthand keys, typed values, list indexes, merging, required inputs."""
from __future__ import annotations

import copy

import pytest

from grounding_dino import config as gd_config
from sdk.errors import SpecError
from sdk.skill_info import load_skill_info
from sdk.spec import (
    apply_overrides,
    dump_spec,
    expand_key,
    get_path,
    load_spec,
    parse_key,
    parse_override,
    resolve_spec,
    set_path,
    validate,
)

TRAIN_DATA = {
    "results_dir": "/results",
    "dataset": {
        "train_data_sources": [{"image_dir": "/d/images", "json_file": "/d/train_odvg.jsonl",
                                "label_map": "/d/train_odvg_labelmap.json"}],
        "val_data_sources": {"image_dir": "/d/val", "json_file": "/d/val.json"},
    },
}


def issue_paths(exc: SpecError) -> list[str]:
    return [issue.path for issue in exc.issues]


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("train.num_epochs=3", "train.num_epochs", 3),
        ("train.optim.lr=1e-4", "train.optim.lr", 1e-4),
        ("train.optim.lr=-2.5E3", "train.optim.lr", -2500.0),
        ("train.optim.lr=0.5", "train.optim.lr", 0.5),
        ("train.is_dry_run=true", "train.is_dry_run", True),
        ("train.is_dry_run=False", "train.is_dry_run", False),
        ("train.pretrained_model_path=null", "train.pretrained_model_path", None),
        ("train.optim.lr_steps=[10,20]", "train.optim.lr_steps", [10, 20]),
        ("train.freeze=[backbone.0, bert]", "train.freeze", ["backbone.0", "bert"]),
        ("inference.color_map={person: red}", "inference.color_map", {"person": "red"}),
        ("model.backbone=resnet_18", "model.backbone", "resnet_18"),
        ("model.text_encoder_type='3'", "model.text_encoder_type", "3"),
        ("results_dir=/a/b=c", "results_dir", "/a/b=c"),
        ("dataset.train_data_sources[0].json_file=/x/a.jsonl", "dataset.train_data_sources[0].json_file",
         "/x/a.jsonl"),
        ("a.b[0][1].c=3", "a.b[0][1].c", 3),
    ],
)
def test_parse_override_typed_values(text, key, value):
    parsed_key, parsed = parse_override(text)
    assert parsed_key == key
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["train.num_epochs", "=3", "train..lr=1", "train.lr[x]=1", "1abc=2",
                                  "a.b[-1]=2", "a.b[*]=1", "train.num_epochs=", "x=[1, 2"])
def test_parse_override_rejects_malformed(text):
    with pytest.raises(SpecError) as info:
        parse_override(text)
    assert len(info.value.issues) == 1


def test_parse_key_tokens():
    assert parse_key("dataset.train_data_sources[0].json_file") == ["dataset", "train_data_sources", 0, "json_file"]
    assert parse_key("a[*].b", wildcard=True) == ["a", "*", "b"]
    with pytest.raises(SpecError):
        parse_key("a[*].b")


def test_get_and_set_path_with_list_indexes():
    spec = {"a": {"items": [{"x": 1}, {"x": 2}]}}
    assert get_path(spec, "a.items[1].x") == 2
    assert get_path(spec, "a.items[5].x", None) is None
    with pytest.raises(KeyError, match=r"a\.nope"):
        get_path(spec, "a.nope")
    set_path(spec, "a.items[1].x", 7)
    set_path(spec, "a.items[2].x", 9)  # one past the end appends one item
    assert spec["a"]["items"] == [{"x": 1}, {"x": 7}, {"x": 9}]
    set_path(spec, "b.c[0]", "new")  # missing sections and lists are created
    assert spec["b"] == {"c": ["new"]}


def test_list_index_beyond_end_is_an_error_naming_the_index():
    spec = {"a": [1]}
    with pytest.raises(SpecError) as info:
        set_path(spec, "a[3]", 5)
    assert issue_paths(info.value) == ["a[3]"]
    assert "length 1" in info.value.issues[0].message and "a[1]" in info.value.issues[0].message
    assert spec == {"a": [1]}


def test_set_path_refuses_to_descend_into_a_value():
    with pytest.raises(SpecError) as info:
        set_path({"model": {"backbone": "resnet_18"}}, "model.backbone.depth", 3)
    assert issue_paths(info.value) == ["model.backbone"]
    with pytest.raises(SpecError, match="not a list"):
        set_path({"model": {"backbone": "resnet_18"}}, "model[0]", 3)


def test_apply_overrides_returns_a_new_dict_and_reports_every_bad_override():
    spec = {"train": {"num_epochs": 1}}
    out = apply_overrides(spec, ["train.num_epochs=4", "train.optim.lr=1e-3"])
    assert out == {"train": {"num_epochs": 4, "optim": {"lr": 1e-3}}}
    assert spec == {"train": {"num_epochs": 1}}
    with pytest.raises(SpecError) as info:
        apply_overrides(spec, ["nokey", "a.b[2]=1", "train.num_epochs=5", "x="])
    assert issue_paths(info.value) == ["nokey", "a.b[2]", "x"]
    assert apply_overrides(spec, {"train.optim.lr_steps": [3, 6]})["train"]["optim"]["lr_steps"] == [3, 6]


def test_shorthand_keys_map_to_their_full_paths():
    shorthand = load_skill_info().shorthand
    assert shorthand["num_epochs"] == "train.num_epochs"
    assert shorthand["resume_checkpoint"] == "train.resume_training_checkpoint_path"
    values = {"num_epochs": 7, "batch_size": 3, "learning_rate": 5e-5, "num_queries": 300, "num_select": 100,
              "max_text_len": 256, "resume_checkpoint": "/ckpt/model_epoch_001_step_00010.pth"}
    spec = resolve_spec("train", TRAIN_DATA, [f"{k}={v}" for k, v in values.items()])
    for short, value in values.items():
        assert get_path(spec, shorthand[short]) == value
    assert set(shorthand) == set(values)
    validate(spec, "train")


def test_resolve_precedence_defaults_then_spec_then_overrides():
    spec_in = copy.deepcopy(TRAIN_DATA)
    spec_in["train"] = {"num_epochs": 30, "optim": {"lr": 1e-4}}
    spec = resolve_spec("train", spec_in, ["train.num_epochs=2"])
    assert spec["train"]["num_epochs"] == 2  # override beats spec
    assert spec["train"]["optim"]["lr"] == 1e-4  # spec beats default
    assert spec["train"]["optim"]["lr_backbone"] == 2e-5  # default kept
    assert spec["model"]["num_queries"] == gd_config.ModelConfig().num_queries
    assert "evaluate" not in spec and "train" in spec  # only the action's sections
    assert spec_in["train"]["num_epochs"] == 30  # inputs untouched


def test_appended_list_item_gets_the_item_defaults():
    spec = resolve_spec("train", {"results_dir": "/r"}, ["dataset.train_data_sources[0].json_file=/a.jsonl"])
    assert spec["dataset"]["train_data_sources"] == [{"image_dir": None, "json_file": "/a.jsonl", "label_map": None,
                                                      "sampling_weight": 1.0}]
    spec = resolve_spec("train", {"dataset": {"train_data_sources": [{"json_file": "/a.jsonl"}]}},
                        ["dataset.train_data_sources[1].json_file=/b.jsonl"])
    assert [s["json_file"] for s in spec["dataset"]["train_data_sources"]] == ["/a.jsonl", "/b.jsonl"]
    assert all("label_map" in s for s in spec["dataset"]["train_data_sources"])


def test_override_into_a_default_list_edits_one_element():
    spec = resolve_spec("train", TRAIN_DATA, ["model.return_interm_indices[1]=3"])
    assert spec["model"]["return_interm_indices"] == [1, 3, 3, 4]


def test_empty_section_keeps_its_defaults(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("results_dir: /r\nevaluate:\nmodel:\n  num_queries: 300\n")
    spec = resolve_spec("evaluate", path)
    assert spec["evaluate"] == gd_config.to_dict(gd_config.EvaluateConfig())
    assert spec["model"]["num_queries"] == 300


def test_yaml_exponent_floats_and_duplicate_keys(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("train:\n  optim:\n    lr: 2e-04\n    lr_backbone: 2E-5\n    weight_decay: 1.0e-4\n")
    optim = load_spec(path)["train"]["optim"]
    assert optim == {"lr": 2e-4, "lr_backbone": 2e-5, "weight_decay": 1e-4}
    path.write_text("train:\n  num_epochs: 3\n  num_epochs: 4\n")
    with pytest.raises(SpecError, match=r"duplicate key 'num_epochs' \(first at line 2\)"):
        load_spec(path)


def test_load_spec_copies_mappings():
    source = {"train": {"freeze": ["bert"]}}
    loaded = load_spec(source)
    loaded["train"]["freeze"].append("x")
    assert source == {"train": {"freeze": ["bert"]}}


def test_dump_spec_round_trips_and_keeps_key_order(tmp_path):
    spec = resolve_spec("train", TRAIN_DATA, ["train.optim.lr=3e-5"])
    path = tmp_path / "out" / "experiment.yaml"
    dump_spec(spec, path)
    loaded = load_spec(path)
    assert loaded == spec
    assert list(loaded) == list(spec) and list(loaded["model"]) == list(spec["model"])
    assert [p.name for p in path.parent.iterdir()] == ["experiment.yaml"]  # no temp file left


def test_validate_reports_every_problem_at_once():
    spec = resolve_spec("train", TRAIN_DATA, [
        "model.num_queries=0", "model.backbone=vgg", "train.optim.lr=fast", "train.precision=fp8",
        "dataset.batch_size=true",
    ])
    spec["model"]["nqueries"] = 5
    with pytest.raises(SpecError) as info:
        validate(spec, "train")
    by_path = {issue.path: issue for issue in info.value.issues}
    assert set(by_path) == {"model.num_queries", "model.backbone", "train.optim.lr", "train.precision",
                            "dataset.batch_size", "model.nqueries"}
    assert "between 1 and 5000" in by_path["model.num_queries"].message
    assert "swin_tiny_224_1k" in by_path["model.backbone"].message
    assert by_path["train.optim.lr"].value == "fast" and "number" in by_path["train.optim.lr"].message
    assert "did you mean 'num_queries'" in by_path["model.nqueries"].message
    assert "got boolean" in by_path["dataset.batch_size"].message


def test_required_inputs_and_filled_by_mappings():
    spec = resolve_spec("evaluate", {"results_dir": "/r"})
    with pytest.raises(SpecError) as info:
        validate(spec, "evaluate")
    assert set(issue_paths(info.value)) == {"dataset.test_data_sources.image_dir",
                                            "dataset.test_data_sources.json_file", "evaluate.checkpoint"}
    assert "missing required data source" in str(info.value)
    spec = resolve_spec("evaluate", {"results_dir": "/r"}, ["dataset.test_data_sources.image_dir=/i",
                                                            "dataset.test_data_sources.json_file=/a.json"])
    with pytest.raises(SpecError, match="evaluate.checkpoint, evaluate.trt_engine"):
        validate(spec, "evaluate")
    validate(spec, "evaluate", filled_by_mappings={"evaluate.checkpoint"})
    validate(apply_overrides(spec, ["evaluate.trt_engine=/m.engine"]), "evaluate")  # any_of: the engine suffices


def test_required_if_follows_the_mode():
    base = resolve_spec("quantize", {"results_dir": "/r"}, ["quantize.model_path=/m.onnx", "quantize.evaluate=false"])
    with pytest.raises(SpecError) as info:
        validate(base, "quantize")  # static_ptq (the default) calibrates
    assert set(issue_paths(info.value)) == {"dataset.quant_calibration_data_sources.image_dir",
                                            "dataset.quant_calibration_data_sources.json_file"}
    validate(apply_overrides(base, ["quantize.mode=weight_only_ptq"]), "quantize")


def test_list_inputs_are_checked_per_item():
    spec = resolve_spec("train", TRAIN_DATA, ["dataset.train_data_sources[1].image_dir=/more/images"])
    with pytest.raises(SpecError) as info:
        validate(spec, "train")
    assert issue_paths(info.value) == ["dataset.train_data_sources[1].json_file"]
    validate(spec, "train", filled_by_mappings={"dataset.train_data_sources"})


def test_results_dir_is_required_unless_mapped():
    spec = resolve_spec("train", {**TRAIN_DATA, "results_dir": None})
    with pytest.raises(SpecError) as info:
        validate(spec, "train")
    assert issue_paths(info.value) == ["results_dir"]
    validate(spec, "train", filled_by_mappings={"results_dir"})
    validate(apply_overrides(spec, ["train.results_dir=/only/train"]), "train")


def test_other_actions_sections_are_accepted_and_still_checked():
    full = gd_config.default_spec()
    full.update(results_dir="/r")
    full["dataset"]["test_data_sources"] = {"image_dir": "/i", "json_file": "/a.json"}
    full["evaluate"]["checkpoint"] = "/m.pth"
    validate(resolve_spec("evaluate", full), "evaluate")  # a full experiment spec runs any action
    full["train"]["num_epoch"] = 3
    with pytest.raises(SpecError) as info:
        validate(resolve_spec("evaluate", full), "evaluate")
    assert issue_paths(info.value) == ["train.num_epoch"]


def test_consistency_rules():
    spec = resolve_spec("train", TRAIN_DATA, ["model.num_feature_levels=3",
                                              "dataset.augmentation.train_random_crop_min=700"])
    with pytest.raises(SpecError) as info:
        validate(spec, "train")
    assert issue_paths(info.value) == ["dataset.augmentation.train_random_crop_min", "model.return_interm_indices"]
    validate(apply_overrides(spec, ["model.return_interm_indices=[1,2,3]",
                                    "dataset.augmentation.train_random_crop_min=384"]), "train")


def test_placeholder_values_are_reported():
    spec = resolve_spec("train", TRAIN_DATA, ["train.pretrained_model_path=???"])
    with pytest.raises(SpecError, match=r"train.pretrained_model_path = \"\?\?\?\""):
        validate(spec, "train")


def test_expand_key_over_list_items():
    spec = {"d": {"s": [{"a": 1}, {"b": 2}]}}
    assert expand_key(spec, "d.s[*].a")[0] == ("d.s[0].a", 1)
    assert expand_key(spec, "d.s[*].a")[1][0] == "d.s[1].a"
    assert expand_key(spec, "d.t[*].a") == []
