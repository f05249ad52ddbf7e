"""benchmarks/open_vocab.py: its test set holds each group's names as designed, and the whole run (base, today's
recipe short and long, the new recipe, side by side) works at a tiny size. The AP50 it prints is not checked here: a
handful of steps on a handful of images measures nothing; the benchmark's own run does."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import open_vocab  # noqa: E402


def test_the_groups_are_what_their_names_say():
    from grounding_dino.data.synthetic import vocabulary
    from runner.base_model import read_card

    base = read_card()["data"]
    base_trained = set(vocabulary(base["colors"], base["shapes"], exclude=base.get("holdout", ())))
    finetuned = set(vocabulary(open_vocab.COLORS, open_vocab.SHAPES, exclude=open_vocab.FINETUNE_HOLDOUT))
    finetuned_words = {w for name in finetuned for w in name.split()}
    base_words = {w for name in base_trained for w in name.split()}
    for name in open_vocab.GROUPS["unseen pair, new word"]:
        assert name not in finetuned and name not in base_trained
        assert set(name.split()) <= finetuned_words and not set(name.split()) <= base_words
    for name in open_vocab.GROUPS["unseen pair, base words"]:
        assert name not in finetuned and name not in base_trained
        assert set(name.split()) <= finetuned_words & base_words
    for name in open_vocab.GROUPS["base-only pair"]:
        assert name in base_trained and name not in finetuned
    for name in open_vocab.GROUPS["seen control"]:
        assert name in finetuned
    assert len([n for g, names in open_vocab.GROUPS.items() if g.startswith("unseen") for n in names]) >= 3


def test_group_ap50_averages_the_names_with_ground_truth():
    per_name = {name: 1.0 for names in open_vocab.GROUPS.values() for name in names}
    per_name["purple circle"] = 0.0
    per_name["purple hexagon"] = None  # no objects in the test set: left out, as COCO's mAP does
    groups = open_vocab.group_ap50(per_name)
    assert groups["unseen pair, new word"] == 0.0
    assert groups["seen control"] == 1.0


@pytest.mark.slow
def test_the_benchmark_runs_every_recipe_at_a_tiny_size(tmp_path, capsys):
    assert open_vocab.main(["--num-train", "4", "--num-test", "6", "--num-replay", "4", "--out", str(tmp_path),
                            "--threads", "2"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == {"base", "old", "old_long", "new"}
    for recipe in ("old", "old_long", "new"):
        assert results["results"][recipe]["steps"] > 0
    new_sources = results["settings"]["new_recipe"]["train_data_sources"]
    assert new_sources[1]["sampling_weight"] == pytest.approx(0.3)
    assert set(results["results"]["base"]["groups"]) == set(open_vocab.GROUPS)
    printed = capsys.readouterr().out
    assert "unseen pair, new word" in printed and "targets:" in printed
