"""Structural model settings: every setting that shapes the weights is marked in config.py, and the schema, the SDK's
carried keys, the checkpoint loader and AutoML all read that one mark."""
from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from grounding_dino.config import ACTIONS, ModelConfig, structural_keys

MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
STRUCTURAL = {key[len("model."):] for key in structural_keys()}


def _other_value(name: str, current, special: dict):
    """A valid value of model.`name` other than `current`, from the field's options and bounds."""
    meta = MODEL_FIELDS[name].metadata
    if name in special:
        return special[name]
    if meta["options"] is not None:
        others = [o for o in meta["options"] if o != current]
        return others[0] if others else None
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        up = current + 1
        return up if meta["maximum"] is None or up <= meta["maximum"] else current - 1
    if isinstance(current, float):
        high = meta["maximum"] if meta["maximum"] is not None else current + 1.0
        low = meta["minimum"] if meta["minimum"] is not None else current - 1.0
        return (current + high) / 2 if high > current else (current + low) / 2
    if isinstance(current, list) and current:
        return current[:-1]
    raise AssertionError(f"model.{name}: no other value known for {current!r}; add one to `special`")


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    from grounding_dino.model.text import write_small_text_encoder

    return write_small_text_encoder(tmp_path_factory.mktemp("bert"), hidden_size=32)


def _tiny(text_folder, cls=ModelConfig) -> ModelConfig:
    return cls(backbone="resnet_10t", return_interm_indices=[1, 2, 3], num_feature_levels=4, hidden_dim=32,
               nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=10, max_text_len=16,
               text_encoder_type=text_folder)


def _signature(cfg) -> dict:
    """Name -> shape of every tensor a checkpoint must hold for `cfg` (keys the loader ignores left out)."""
    from grounding_dino.model import build_model
    from grounding_dino.model.checkpoint import UNUSED

    return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items() if not UNUSED.search(k)}


def test_every_setting_that_shapes_the_weights_is_marked(text_folder, tmp_path):
    read = set()

    class Recording(ModelConfig):
        """Records which settings building the model reads: a setting it never reads cannot shape the weights."""

        def __getattribute__(self, name):
            if name in MODEL_FIELDS:
                read.add(name)
            return super().__getattribute__(name)

    base = _tiny(text_folder, Recording)
    baseline = _signature(base)
    assert {"hidden_dim", "embed_init_tgt", "backbone"} <= read  # the recorder sees the builder's reads
    assert _signature(dataclasses.replace(base, embed_init_tgt=False)) != baseline  # and the check sees a change

    from grounding_dino.model import build_model

    backbone_file = tmp_path / "backbone.pth"
    torch.save(build_model(base).backbone[0].body.state_dict(), backbone_file)
    special = {"pretrained_backbone_path": str(backbone_file)}
    unmarked = []
    for name in sorted(read - STRUCTURAL):
        value = _other_value(name, getattr(base, name), special)
        if value is None:  # a single allowed value: nothing to change
            continue
        if _signature(dataclasses.replace(base, **{name: value})) != baseline:
            unmarked.append(f"model.{name}={value!r}")
    assert not unmarked, (f"{unmarked} change the names or shapes of the weights; declare them with "
                          "param(..., structural=True) in grounding_dino/config.py")


def test_every_place_reads_the_one_list():
    from grounding_dino.model.checkpoint import STRUCTURAL_KEYS as loader_keys
    from runner.automl.search_space import EXCLUSION_RULES
    from sdk import schema_gen
    from sdk.mappings import CARRIED_KEYS
    from sdk.mappings import STRUCTURAL_KEYS as carried_keys

    keys = structural_keys()
    assert {"model.embed_init_tgt", "model.hidden_dim", "model.log_scale", "model.text_encoder_type"} <= set(keys)
    assert carried_keys == keys and not set(CARRIED_KEYS) & set(keys)
    assert tuple(f"model.{k}" for k in loader_keys) == keys
    for key in keys:
        assert "structural" in EXCLUSION_RULES[key]({}), key
    for action in ACTIONS:
        schema = schema_gen.action_schema(action)
        marked = [key for key, sub in schema_gen._leaves(schema) if sub.get("x-structural")]
        assert sorted(marked) == sorted(keys), action


# text_encoder_type names a folder; the loader judges it by the text encoder's weights (see checkpoint.py).
@pytest.mark.parametrize("name", sorted(STRUCTURAL - {"text_encoder_type"}))
def test_a_checkpoint_with_another_structural_value_is_refused(name):
    from grounding_dino.model.checkpoint import config_conflicts

    cfg = ModelConfig()
    saved = dataclasses.asdict(cfg)
    saved[name] = _other_value(name, getattr(cfg, name), {"log_scale": "auto"})
    assert [line.split(":")[0] for line in config_conflicts(saved, cfg)] == [f"model.{name}"]
