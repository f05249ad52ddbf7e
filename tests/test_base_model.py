"""The packaged base model: packing format, loading without text-encoder weights, the shipped file and its card."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from runner import base_model
from grounding_dino.config import ModelConfig, from_dict, load_experiment
from grounding_dino.model import build_model
from grounding_dino.model.checkpoint import load_weights
from grounding_dino.model.text import write_small_text_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MAX_BYTES = 25 * 1024 * 1024


def base_config(**changes) -> ModelConfig:
    return from_dict(ModelConfig, {**base_model.model_section(), **changes})


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(base_config())
    path = base_model.pack(model, tmp_path_factory.mktemp("pack") / "base_model.pth")
    return model, path


def test_packed_file_holds_fp16_weights_without_the_text_encoder(packed):
    model, path = packed
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert set(saved) == {"model", "model_config", "text_encoder", "tao_model"}
    assert saved["text_encoder"] == "minilm" and saved["tao_model"] == "grounding_dino"
    assert saved["model_config"] == dataclasses.asdict(model.cfg)
    assert not [k for k in saved["model"] if k.startswith("bert.")]
    assert {v.dtype for v in saved["model"].values()} == {torch.float16}
    own = {k for k in model.state_dict() if not k.startswith("bert.") and not k.endswith("num_batches_tracked")}
    assert set(saved["model"]) == own


def test_packed_file_loads_with_nothing_missing_but_the_declared_text_encoder(packed):
    model, path = packed
    fresh = build_model(base_config())
    minilm_before = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("bert.")}
    report = load_weights(fresh, path)  # strict: raises on any missing, unexpected or mis-shaped key
    assert report.ok and report.format == "ours"
    state = fresh.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("bert."):
            assert torch.equal(state[key], minilm_before[key]), key  # the packaged MiniLM, untouched
        elif value.is_floating_point():
            assert state[key].dtype == torch.float32
            assert torch.equal(state[key], value.half().float()), key


def test_packed_file_stores_the_text_layers_a_build_trained_and_loads_them_back(packed, tmp_path):
    model, _ = packed
    trained = build_model(base_config())
    trained.load_state_dict(model.state_dict())
    key = "bert.encoder.layer.5.output.dense.weight"
    with torch.no_grad():
        trained.state_dict()[key].add_(0.01)
    path = base_model.pack(trained, tmp_path / "base_model.pth")
    saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert [k for k in saved if k.startswith("bert.")] == [key]
    fresh = build_model(base_config())
    untouched = "bert.encoder.layer.4.output.dense.weight"
    before = fresh.state_dict()[untouched].clone()
    assert load_weights(fresh, path).ok
    assert torch.equal(fresh.state_dict()[key], trained.state_dict()[key].half().float())
    assert torch.equal(fresh.state_dict()[untouched], before)


def test_text_layers_freeze_all_but_the_top_ones():
    assert base_model.text_freeze(0) == ["bert"]
    model = build_model(base_config())
    from grounding_dino.lightning_module import freeze

    frozen = set(freeze(model, base_model.text_freeze(2)))
    bert = [n for n, _ in model.named_parameters() if n.startswith("bert.")]
    trainable = {n.split(".")[3] for n in bert if n not in frozen}
    assert trainable == {"4", "5"} and all(n.startswith("bert.encoder.layer.") for n in bert if n not in frozen)
    with pytest.raises(ValueError, match="--text-layers 7: the text encoder has 6 layers"):
        base_model.text_freeze(7)


def test_packed_file_refuses_another_text_encoder(packed, tmp_path):
    _, path = packed
    other = build_model(base_config(text_encoder_type=write_small_text_encoder(tmp_path / "bert")))
    with pytest.raises(ValueError, match="model.text_encoder_type: minilm"):
        load_weights(other, path)


def test_packed_file_starts_training_and_evaluation(packed, tmp_path):
    """The two other ways in: train.pretrained_model_path and evaluate.checkpoint."""
    from grounding_dino.predictor import TorchPredictor
    from grounding_dino.actions.train import build_module

    model, path = packed
    spec = {"model": base_model.model_section(), "train": {"pretrained_model_path": str(path)},
            "evaluate": {"checkpoint": str(path)}}
    cfg = load_experiment(spec)
    module = build_module(cfg)
    predictor = TorchPredictor.load(str(path), cfg)
    key = "transformer.tgt_embed.weight"
    expected = model.state_dict()[key].half().float()
    assert torch.equal(module.model.state_dict()[key], expected)
    assert torch.equal(predictor.model.state_dict()[key], expected)


def test_shipped_base_model_is_small_and_matches_its_card():
    path = base_model.BASE_MODEL
    card = base_model.read_card(path)
    assert path.stat().st_size <= MAX_BYTES
    assert card["size_bytes"] == path.stat().st_size
    assert card["sha256"] == base_model.sha256(path)
    assert card["text_encoder"] == "minilm" and card["model"] == base_model.MODEL
    last = base_model.card_stages(card)[-1]["recipe_args"]  # the data section describes the last stage's data
    assert card["data"]["seed"] == base_model.SEED
    assert card["data"]["colors"] == list(base_model._names(last.get("colors"), base_model.COLORS))
    assert card["data"]["shapes"] == list(base_model._names(last.get("shapes"), base_model.SHAPES))
    assert card["train"]["steps"] > 0 and card["train"]["seconds"] > 0
    assert card["recipe"].startswith("python -m runner.base_model build")
    stages = card.get("stages", [])
    if stages:  # built in stages: the card accounts for each, and each continued from the one before
        assert card["recipe"] == " && ".join(base_model.recipe_commands(stages))
        assert card["train"]["steps"] == sum(s["train"]["steps"] for s in stages)
        assert all("init_sha256" in s["train"] for s in stages[1:]) and "init_sha256" not in stages[0]["train"]
    report = load_weights(build_model(base_config()), path)
    assert report.ok


TWO_STAGES = [
    {"recipe_args": {"minutes": 4.5, "epochs": None, "batch_size": 32, "num_train": 6000, "lr": 5e-4,
                     "device": "cuda"},
     "train": {"epochs": 6, "steps": 1128, "seconds": 251.0}},
    {"recipe_args": {"minutes": 90, "epochs": None, "batch_size": 4, "num_train": 3000, "lr": 2e-4,
                     "text_layers": 2, "device": "cpu"},
     "train": {"epochs": 4, "steps": 3000, "seconds": 5400.0, "init_sha256": "ab" * 32}},
]


def test_recipe_chains_the_stages_from_scratch():
    first, second = base_model.recipe_commands(TWO_STAGES)
    assert first == ("python -m runner.base_model build --out stage1 --minutes 4.5 --batch-size 32 "
                     "--num-train 6000 --lr 0.0005 --device cuda")
    assert second.endswith("--lr 0.0002 --text-layers 2 --device cpu --init stage1/base_model.pth")
    assert "--out stage2" in second


def test_a_stage_with_its_own_vocabulary_replays_it():
    stage = {"recipe_args": {"minutes": 50, "epochs": None, "batch_size": 4, "num_train": 3000, "lr": 1e-4,
                             "text_layers": 2, "colors": "red,orange", "shapes": "circle,hexagon",
                             "holdout": "orange hexagon", "device": "cpu"},
             "train": {"epochs": 5, "steps": 3750, "seconds": 3000.0}}
    *_, last = base_model.recipe_commands(TWO_STAGES + [stage])
    assert "--colors red,orange --shapes circle,hexagon --holdout 'orange hexagon' --device cpu" in last
    from runner.demo import base_build_commands

    argv = base_build_commands({"stages": TWO_STAGES + [stage]}, Path("/tmp/x"))[-1]
    assert argv[argv.index("--holdout") + 1] == "orange hexagon" and argv[argv.index("--epochs") + 1] == "5"


@pytest.mark.parametrize("options, message", [
    ({"colors": "red,mauve"}, "unknown colour 'mauve'"),
    ({"shapes": "circle,blob"}, "unknown shape 'blob'"),
    ({"colors": "red,blue", "holdout": "green circle"}, "--holdout green circle: not colour x shape names"),
])
def test_build_refuses_a_vocabulary_it_cannot_draw_before_writing(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        base_model.build(tmp_path / "out", epochs=1, **options)
    assert not (tmp_path / "out").exists()


def test_demo_rebuild_replays_each_stage_by_the_epochs_it_ran(tmp_path):
    from runner.demo import base_build_commands

    commands = base_build_commands({"stages": TWO_STAGES}, tmp_path)
    assert [c[c.index("--epochs") + 1] for c in commands] == ["6", "4"]
    assert "--text-layers" not in commands[0] and commands[1][commands[1].index("--text-layers") + 1] == "2"
    assert not any("--minutes" in c or "--device" in c for c in commands)  # the same work on whatever device
    assert commands[1][-2:] == ["--init", str(tmp_path / "stage1" / "base_model.pth")]
    with pytest.raises(ValueError, match="several stages"):
        base_build_commands({"stages": TWO_STAGES}, tmp_path, minutes=5)
    one = base_build_commands({"recipe_args": TWO_STAGES[0]["recipe_args"], "train": TWO_STAGES[0]["train"]},
                              tmp_path, minutes=5)
    assert len(one) == 1 and one[0][one[0].index("--minutes") + 1] == "5" and "--init" not in one[0]


def test_build_refuses_to_continue_from_a_missing_or_foreign_file(packed, tmp_path):
    with pytest.raises(FileNotFoundError, match="--init .*no such file"):
        base_model.build(tmp_path / "out", epochs=1, init=str(tmp_path / "nothing.pth"))
    _, path = packed
    base_model._write_card(base_model.card_path(path), {"model": {**base_model.MODEL, "hidden_dim": 64}})
    with pytest.raises(ValueError, match="another architecture"):
        base_model.build(tmp_path / "out", epochs=1, init=str(path))
    assert not (tmp_path / "out").exists()  # refused before any data or training


def test_shipped_base_model_reaches_its_target():
    assert base_model.read_card(base_model.BASE_MODEL)["val_mAP50"] >= 0.7


@pytest.mark.slow
def test_card_matches_an_evaluate_job_on_the_base_val_set(tmp_path):
    """Re-evaluate the shipped file through an SDK job on the val set regenerated from the card's seed."""
    from sdk import SkillBank

    card = base_model.read_card()
    paths = base_model.regenerate_val(tmp_path / "data", card["data"])
    spec = base_model.eval_spec(paths["val_image_dir"], paths["val_json_file"], str(base_model.BASE_MODEL), "x")
    del spec["results_dir"]  # the SDK puts results in the job folder
    bank = SkillBank(tmp_path / "ws")
    job = bank.wait(bank.create_job("evaluate", spec=spec).id, timeout=600)
    assert job.status == "done", bank.logs(job.id, tail=30)
    results = json.loads(next(job.results_dir.rglob("results.json")).read_text())
    assert results["mAP50"] == pytest.approx(card["val_mAP50"], abs=1e-6)
    assert results["mAP"] == pytest.approx(card["val_mAP"], abs=1e-6)
