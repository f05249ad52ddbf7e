"""Only finite, sane numbers in a spec, and bounded parsing of spec files: NaN, infinity, out-of-range integers and
empty or out-of-range lists are refused with the key and the allowed range; YAML bombs, recursive aliases, deep
nesting and huge files are refused within a second, naming the limit and the file."""
from __future__ import annotations


import pytest

from grounding_dino import config as gd_config
from sdk import schema_gen
from sdk.errors import SpecError
from sdk.spec import (MAX_SPEC_BYTES, MAX_SPEC_DEPTH, MAX_SPEC_NODES, apply_overrides, load_spec, parse_override,
                      resolve_spec, validate)

TRAIN = {
    "results_dir": "/results",
    "dataset": {"train_data_sources": [{"image_dir": "/d/images", "json_file": "/d/train_odvg.jsonl",
                                        "label_map": "/d/labelmap.json"}],
                "val_data_sources": {"image_dir": "/d/images", "json_file": "/d/val.json"}},
}


def refused(overrides, action="train"):
    """The one issue validation reports for `overrides`."""
    with pytest.raises(SpecError) as info:
        validate(resolve_spec(action, TRAIN, overrides), action)
    assert len(info.value.issues) == 1, str(info.value)
    return info.value.issues[0]


@pytest.mark.parametrize("override, path, words", [
    ("train.optim.lr=.nan", "train.optim.lr", ["NaN and infinity are not allowed", "> 0.0 and <= 1.0"]),
    ("train.optim.lr=.inf", "train.optim.lr", ["NaN and infinity are not allowed", "> 0.0 and <= 1.0"]),
    ("train.optim.lr=-.inf", "train.optim.lr", ["NaN and infinity are not allowed"]),
    ("inference.conf_threshold=.nan", "inference.conf_threshold", ["NaN and infinity", "between 0.0 and 1.0"]),
    ("model.focal_gamma=.inf", "model.focal_gamma", ["NaN and infinity", ">= 0.0"]),
    ("model.num_queries=.nan", "model.num_queries", ["an integer between 1 and 5000", "NaN"]),
    ("model.num_queries=1e10", "model.num_queries", ["expected an integer between 1 and 5000"]),
    ("model.num_queries=10000000000", "model.num_queries", ["out of range: must be between 1 and 5000"]),
    ("dataset.batch_size=100000", "dataset.batch_size", ["between 1 and 1024"]),
    ("train.num_epochs=3.0", "train.num_epochs", ["expected an integer between 1 and 100000, got number"]),
    ("dataset.augmentation.scales=[]", "dataset.augmentation.scales",
     ["has 0 items", "1 to 64 items, each between 1 and 8192"]),
    ("dataset.augmentation.scales=[-5]", "dataset.augmentation.scales[0]", ["between 1 and 8192"]),
    ("dataset.augmentation.input_mean=[0.5, .nan, 0.4]", "dataset.augmentation.input_mean[1]",
     ["NaN", "between 0.0 and 1.0"]),
    ("dataset.augmentation.input_std=[0.2, 0.2]", "dataset.augmentation.input_std", ["exactly 3 items"]),
    ("model.return_interm_indices=[1, 2, 3, 9]", "model.return_interm_indices[3]", ["between 0 and 4"]),
    ("quantize.backend_kwargs={a: .inf}", "quantize.backend_kwargs.a", ["NaN and infinity are not allowed"]),
])
def test_number_out_of_bounds_is_refused_with_the_key_and_the_range(override, path, words):
    issue = refused([override])
    assert issue.path == path
    for word in words:
        assert word in issue.message, issue.message


def test_non_finite_numbers_in_a_spec_mapping_are_refused_too():
    spec = resolve_spec("train", {**TRAIN, "train": {"optim": {"weight_decay": float("inf")}}})
    with pytest.raises(SpecError, match=r"train\.optim\.weight_decay = Infinity: must be a finite number >= 0\.0"):
        validate(spec, "train")


def _leaves(schema, prefix=""):
    for name, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            yield from _leaves(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", sub
            items = sub.get("items") or {}
            if "properties" in items:
                yield from _leaves(items, f"{prefix}{name}[].")


def _types(sub):
    return set(sub["type"] if isinstance(sub.get("type"), list) else [sub.get("type")])


def test_every_integer_has_a_maximum_and_every_list_a_length_limit():
    schema = schema_gen.experiment_schema()
    leaves = dict(_leaves(schema))
    unbounded = [k for k, s in leaves.items() if "integer" in _types(s) and "enum" not in s and "maximum" not in s]
    assert unbounded == []
    no_length = [k for k, s in leaves.items() if "array" in _types(s) and "maxItems" not in s]
    assert no_length == []
    numeric_items = [k for k, s in leaves.items() if "array" in _types(s)
                     and _types(s["items"]) & {"integer", "number"} and "maximum" not in s["items"]]
    assert numeric_items == ["dataset.eval_class_ids"]  # category ids: any non-negative integer


def test_defaults_are_within_their_bounds_and_the_schema_default_is_the_runtime_default():
    runtime = gd_config.default_spec()
    for action in gd_config.ACTIONS:
        schema = schema_gen.build_action_schema(action)
        assert schema["default"] == schema_gen.action_default(action)
        assert all(schema["default"][key] == runtime[key] for key in schema["default"])
    validate(resolve_spec("train", TRAIN), "train")  # the defaults themselves pass every bound


# ---------------------------------------------------------------------------------------------------------------
# bounded parsing


def laughs(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nmodel: {{backbone: *a{levels}}}\n"


def merge_laughs(levels: int) -> str:
    """Mappings that each merge ten copies of the one before (`<<: [*m0, *m0, ...]`)."""
    lines = ["m0: &m0 {k0: x, k1: x, k2: x, k3: x, k4: x, k5: x, k6: x, k7: x, k8: x, k9: x}"]
    lines += [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}], own{i}: y}}" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\ntrain: {{optim: *m{levels}}}\n"


BOMBS = {
    "billion-laughs-9": (laughs(9), f"more than {MAX_SPEC_NODES:,} values"),
    "billion-laughs-8": (laughs(8), f"more than {MAX_SPEC_NODES:,} values"),
    "laughs-through-merge-keys": (merge_laughs(6), f"more than {MAX_SPEC_NODES:,} values"),
    "recursive-alias-list": ("model: &a [*a]\n", "recursive alias"),
    "recursive-alias-mapping": ("model: &m {backbone: *m}\n", "recursive alias"),
    "nesting-3000-flow": ("model: " + "[" * 3000 + "]" * 3000 + "\n", f"deeper than {MAX_SPEC_DEPTH} levels"),
    "nesting-200-block": ("".join(" " * i + f"k{i}:\n" for i in range(200)), f"deeper than {MAX_SPEC_DEPTH} levels"),
    "larger-than-1-mib": ("results_dir: " + "x" * MAX_SPEC_BYTES + "\n", f"limit of {MAX_SPEC_BYTES:,} bytes"),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
@pytest.mark.timeout(60)  # an expanded bomb would run for hours: it must be refused before expansion
def test_spec_bomb_is_refused_naming_the_limit_and_the_file(name, tmp_path):
    text, words = BOMBS[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        resolve_spec("train", path)
    message = str(info.value)
    assert str(path) in message and words in message and "refused" in message, message
    if "recursive" not in name:
        assert "limit" in message


def test_a_spec_just_under_the_limits_loads(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("model: {backbone_names: " + "[" * (MAX_SPEC_DEPTH - 3) + "]" * (MAX_SPEC_DEPTH - 3) + "}\n"
                    + f"train: {{freeze: [{', '.join(['bert'] * 5000)}]}}\n")
    assert len(load_spec(path)["train"]["freeze"]) == 5000


def test_bomb_in_an_override_value_or_a_mapping_is_refused():
    with pytest.raises(SpecError, match=r"train\.freeze: override value refused: the YAML contains itself"):
        parse_override("train.freeze=&a [*a]")
    endless: list = []
    endless.append(endless)
    with pytest.raises(SpecError, match=r"<spec>: refused: the spec contains itself"):
        load_spec({"train": {"freeze": endless}})
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(SpecError, match=rf"train\.freeze: refused: the value nests deeper than {MAX_SPEC_DEPTH}"):
        apply_overrides({}, {"train.freeze": deep})
