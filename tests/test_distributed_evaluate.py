"""evaluate (and inference) with num_gpus > 1: CPU worker processes, each on a shard of whole batches, write what one
process writes (grounding_dino.actions.sharding)."""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from conftest import tiny_spec

from grounding_dino.status import read_status


@pytest.fixture
def cpu_only(monkeypatch):
    """The CPU path on any machine: without it a GPU machine would put each rank on a GPU (and refuse more ranks
    than it has GPUs). The workers inherit the environment; this process is told by the patch."""
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _spec(tiny_train_spec, root: Path, images: int) -> dict:
    """The shared tiny spec (1+1 layers) scoring a random model on the first `images` validation images, 2 a batch."""
    import torch

    from grounding_dino.config import load_experiment
    from grounding_dino.model import build_model
    from grounding_dino.model.checkpoint import native_checkpoint

    paths = tiny_train_spec["_paths"]
    val = json.loads(Path(paths["val_json_file"]).read_text())
    kept = {image["id"] for image in val["images"][:images]}
    val["images"] = val["images"][:images]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in kept]
    (root / "test.json").write_text(json.dumps(val))
    spec = tiny_spec(tiny_train_spec, root, **{"model.enc_layers": 1, "model.dec_layers": 1,
                                               "dataset.batch_size": 2})
    spec["dataset"]["test_data_sources"] = {"image_dir": paths["val_image_dir"], "json_file": str(root / "test.json")}
    torch.manual_seed(0)
    torch.save(native_checkpoint(build_model(load_experiment(spec).model)), root / "random.pth")
    spec["evaluate"] = {"checkpoint": str(root / "random.pth")}
    return spec


def _evaluate(spec: dict, out: Path, num_gpus: int) -> Path:
    from grounding_dino.actions import run_action
    from grounding_dino.config import load_experiment

    spec = json.loads(json.dumps(spec))
    spec["evaluate"].update(results_dir=str(out), num_gpus=num_gpus)
    assert run_action("evaluate", load_experiment(spec)) == 0
    return out


def _assert_same_detections(ours: list, theirs: list) -> None:
    """The same records image by image, as multisets: the workers run on fewer threads, so scores may differ in the
    last float32 bits, and near-equal scores may then come in another order."""
    def by_image(records):
        out = {}
        for r in records:
            out.setdefault(r["image_id"], []).append(r)
        return out

    ours, theirs = by_image(ours), by_image(theirs)
    assert sorted(ours) == sorted(theirs)
    for image_id, left in theirs.items():
        right = list(ours[image_id])
        assert len(right) == len(left), f"image {image_id}"
        for record in left:
            match = next((r for r in right if r["category_id"] == record["category_id"]
                          and r.get("file_name") == record.get("file_name")
                          and abs(r["score"] - record["score"]) <= 1e-6
                          and r["bbox"] == pytest.approx(record["bbox"], abs=1e-4)), None)
            assert match is not None, f"image {image_id}: {record} has no counterpart"
            right.remove(match)


def test_shards_cover_every_image_once_in_the_batches_of_one_process():
    from grounding_dino.actions.sharding import ShardBatches

    for size in (1, 5, 7, 8):
        for batch_size in (1, 2, 3, 4):
            one = list(ShardBatches(size, batch_size, 0, 1))
            for world in (1, 2, 3, 4):
                shards = [list(ShardBatches(size, batch_size, rank, world)) for rank in range(world)]
                assert [len(s) for s in shards] == [len(ShardBatches(size, batch_size, r, world))
                                                    for r in range(world)]
                assert sorted(b for s in shards for b in s) == sorted(one)  # same batches, none twice
                assert sorted(i for s in shards for b in s for i in b) == list(range(size))


def test_two_processes_evaluate_as_one(tiny_train_spec, cpu_only, tmp_path, caplog):
    """5 images in batches of 2: rank 0 runs batches 0 and 2 (3 images), rank 1 batch 1 (2 images)."""
    import logging

    spec = _spec(tiny_train_spec, tmp_path, images=5)
    one = _evaluate(spec, tmp_path / "one", 1)
    with caplog.at_level(logging.INFO, logger="grounding_dino.actions.evaluate"):
        two = _evaluate(spec, tmp_path / "two", 2)
    assert "evaluated 5 images on 2 processes" in caplog.text  # the sharded path ran, and saw every image
    assert multiprocessing.active_children() == []

    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [r["status"] for r in read_status(two / "status.json")] == ["STARTED", "SUCCESS"]

    metrics = {name: json.loads((folder / "results.json").read_text()) for name, folder in (("1", one), ("2", two))}
    assert metrics["2"].pop("null_reasons", None) == metrics["1"].pop("null_reasons", None)
    assert metrics["2"] == pytest.approx(metrics["1"], abs=1e-6)
    # Equal zeros would compare nothing: the random model must score something on these images.
    assert metrics["1"]["AR100"] > 0

    per_class = {name: json.loads((folder / "per_class.json").read_text()) for name, folder in (("1", one), ("2", two))}
    assert [{k: v for k, v in row.items() if k not in ("AP", "AP50")} for row in per_class["2"]] == \
        [{k: v for k, v in row.items() if k not in ("AP", "AP50")} for row in per_class["1"]]
    for row2, row1 in zip(per_class["2"], per_class["1"]):
        assert (row2["AP"], row2["AP50"]) == pytest.approx((row1["AP"], row1["AP50"]), abs=1e-6)

    detections = {name: json.loads((folder / "detections.json").read_text()) for name, folder in (("1", one),
                                                                                                  ("2", two))}
    assert len({d["image_id"] for d in detections["1"]}) == 5
    assert len(detections["1"]) == 5 * 100  # num_select per image
    _assert_same_detections(detections["2"], detections["1"])


def test_onnx_model_on_several_processes_is_refused(tiny_train_spec, tmp_path):
    """A one-line UserError naming the key and the fix; the file is not even opened (its bytes are no model)."""
    from grounding_dino.actions import run_action
    from grounding_dino.actions.sharding import check_processes
    from grounding_dino.config import load_experiment
    from grounding_dino.errors import UserError

    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read: the refusal comes first")
    spec = tiny_spec(tiny_train_spec, tmp_path)
    spec["evaluate"] = {"checkpoint": str(model), "num_gpus": 3}
    with pytest.raises(UserError, match=rf"^evaluate.num_gpus is 3 but evaluate.checkpoint {model} is an ONNX "
                                        r"model, which runs in one process; [^\n]* Fix: set evaluate.num_gpus to 1$"):
        run_action("evaluate", load_experiment(spec))
    assert not list(tmp_path.rglob("experiment.yaml")) and not list(tmp_path.rglob("status.json"))
    spec["evaluate"]["num_gpus"] = 1
    assert check_processes(load_experiment(spec), "evaluate", str(model)) == 1


def test_each_rank_gets_its_gpu(tiny_train_spec, tmp_path, monkeypatch):
    """As train maps them: gpu_ids when it lists num_gpus GPUs, 0..num_gpus-1 for the default [0]; more ranks than
    visible GPUs, or a list of another length, is a UserError naming the keys."""
    import torch

    from grounding_dino.actions.sharding import rank_gpus
    from grounding_dino.config import load_experiment
    from grounding_dino.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)

    def gpus(**inference):
        return rank_gpus(load_experiment(dict(tiny_spec(tiny_train_spec, tmp_path), inference=inference)), "inference")

    assert gpus(num_gpus=2) == [0, 1]
    assert gpus(num_gpus=2, gpu_ids=[3, 1]) == [3, 1]
    with pytest.raises(UserError, match=r"^inference.gpu_ids \[1, 2\] lists 2 GPUs but inference.num_gpus is 3"):
        gpus(num_gpus=3, gpu_ids=[1, 2])
    with pytest.raises(UserError, match=r"^inference.num_gpus 2 needs distinct GPUs \[2, 4\] but 4 GPU\(s\) are "
                                        r"visible"):
        gpus(num_gpus=2, gpu_ids=[2, 4])
    with pytest.raises(UserError, match=r"needs distinct GPUs \[0, 1, 2, 3, 4\]"):
        gpus(num_gpus=5)


# Worker targets for run_sharded: module level, so the spawned workers import them by name.
def _rank_one_raises(cfg, rank, world):
    from grounding_dino.errors import UserError

    if rank == 1:
        raise UserError("rank one cannot read its image")
    time.sleep(120)  # rank 0 is still at work when rank 1 fails: it must be stopped, not waited for


def _rank_one_dies(cfg, rank, world):
    if rank == 1:
        os._exit(3)
    time.sleep(120)


def _rank_and_pid(cfg, rank, world, extra):
    return rank, world, extra, os.getpid()


@pytest.mark.parametrize("target, error, message", [
    (_rank_one_raises, "UserError", r"^rank one cannot read its image$"),
    (_rank_one_dies, "RuntimeError", r"^evaluate process 1 of 3 ended with exit code 3 without a result"),
])
@pytest.mark.timeout(100)  # the other ranks sleep 120 s: a launcher that waits for them hangs past this
def test_a_failing_worker_stops_the_others(tiny_train_spec, cpu_only, tmp_path, target, error, message):
    from grounding_dino.actions.sharding import run_sharded
    from grounding_dino.config import load_experiment

    cfg = load_experiment(dict(tiny_spec(tiny_train_spec, tmp_path), evaluate={"num_gpus": 3}))
    with pytest.raises(Exception, match=message) as raised:
        run_sharded(target, cfg, "evaluate", 3)
    assert type(raised.value).__name__ == error
    assert multiprocessing.active_children() == [], "worker processes outlived the failure"


def test_results_come_back_in_rank_order_from_separate_processes(tiny_train_spec, cpu_only, tmp_path):
    from grounding_dino.actions.sharding import run_sharded
    from grounding_dino.config import load_experiment

    cfg = load_experiment(dict(tiny_spec(tiny_train_spec, tmp_path), evaluate={"num_gpus": 2}))
    results = run_sharded(_rank_and_pid, cfg, "evaluate", 2, "extra")
    assert [r[:3] for r in results] == [(0, 2, "extra"), (1, 2, "extra")]
    assert len({r[3] for r in results} | {os.getpid()}) == 3
    assert multiprocessing.active_children() == []


def test_two_processes_infer_as_one(tiny_train_spec, cpu_only, tmp_path):
    """3 images in batches of 2: rank 0 writes two images' files, rank 1 one; results.json is written once."""
    from PIL import Image

    from grounding_dino.actions import run_action
    from grounding_dino.config import load_experiment

    spec = _spec(tiny_train_spec, tmp_path, images=1)
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted(Path(tiny_train_spec["_paths"]["val_image_dir"]).iterdir())[:3]:
        with Image.open(source) as image:
            image.save(images / f"{source.stem}.png")
    spec["dataset"]["infer_data_sources"] = {"image_dir": [str(images)], "captions": ["red circle", "blue square"]}
    spec["model"]["num_select"] = 5
    outputs = {}
    for num_gpus in (1, 2):
        spec["inference"] = {"checkpoint": spec["evaluate"]["checkpoint"], "conf_threshold": 0.0, "num_gpus": num_gpus,
                             "results_dir": str(tmp_path / f"infer{num_gpus}")}
        assert run_action("inference", load_experiment(spec)) == 0
        outputs[num_gpus] = tmp_path / f"infer{num_gpus}"
    assert multiprocessing.active_children() == []

    def files(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    assert files(outputs[2]) == files(outputs[1])
    records = {n: json.loads((outputs[n] / "results.json").read_text()) for n in (1, 2)}
    assert len(records[1]) == 3 * 5 and [r["image_id"] for r in records[1]] == sorted(r["image_id"] for r in records[1])
    # Image order as one process writes it; within an image, near-equal scores may trade places (see the helper).
    assert [r["image_id"] for r in records[2]] == [r["image_id"] for r in records[1]]
    _assert_same_detections(records[2], records[1])
    for label in (outputs[1] / "labels").iterdir():
        assert len((outputs[2] / "labels" / label.name).read_text().splitlines()) == 5
