"""`job create --dataset ROLE=PATH` / `create_job(datasets=...)`: dataset folders given by role fill the data keys
from the files they hold, as skill_info's data_sources (and SKILL.md's data table) describe."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from runner.cli import main as cli
from sdk.errors import SkillBankError
from sdk.jobs import SkillBank
from sdk.spec import load_spec


def _role_folders(tiny_data: dict, tmp_path: Path) -> dict:
    """The tiny data laid out as dataset folders: train (images/ folder), eval (images.tar.gz); the second train
    folder has no label map."""
    root = tiny_data["root"]
    train, train2, val = tmp_path / "train", tmp_path / "train2", tmp_path / "val"
    for folder in (train, train2):
        shutil.copytree(root / "images", folder / "images")
        shutil.copy(root / "train_odvg.jsonl", folder / "annotations_odvg.jsonl")
    shutil.copy(root / "labelmap.json", train / "annotations_odvg_labelmap.json")
    val.mkdir()
    shutil.copy(root / "val.json", val / "annotations.json")
    with tarfile.open(val / "images.tar.gz", "w:gz") as archive:
        for image in (root / "images").iterdir():
            archive.add(image, arcname=image.name)
    return {"train": train, "train2": train2, "val": val}


def test_train_roles_fill_the_data_keys(workspace, tiny_data, tmp_path):
    folders = _role_folders(tiny_data, tmp_path)
    bank = SkillBank(workspace)
    datasets = {"train_datasets": [folders["train"], folders["train2"]], "eval_dataset": str(folders["val"])}
    # The label map is optional (grounding data has none), so its absence is left to preflight, which knows
    # these lines are detection data.
    with pytest.raises(SkillBankError, match=r"dataset.train_data_sources\[1\].label_map .*needs a label map"):
        bank.create_job("train", automl_policy="off", start=False, datasets=datasets)
    shutil.copy(folders["train"] / "annotations_odvg_labelmap.json", folders["train2"])
    job = bank.create_job("train", automl_policy="off", start=False, datasets=datasets)
    data = load_spec(job.path / "spec.yaml")["dataset"]
    train, train2, val = (str(folders[k].resolve()) for k in ("train", "train2", "val"))
    assert data["train_data_sources"] == [
        {"image_dir": f"{folder}/images", "json_file": f"{folder}/annotations_odvg.jsonl",
         "label_map": f"{folder}/annotations_odvg_labelmap.json", "sampling_weight": 1.0} for folder in (train, train2)]
    assert data["val_data_sources"] == {"image_dir": f"{val}/images.tar.gz", "json_file": f"{val}/annotations.json"}


def test_overrides_win_over_a_dataset_folder(workspace, tiny_data, tmp_path):
    folders = _role_folders(tiny_data, tmp_path)
    other = str(tiny_data["root"] / "val.json")
    job = SkillBank(workspace).create_job(
        "train", tiny_data["spec"], [f"dataset.val_data_sources.json_file={other}"], automl_policy="off",
        start=False, datasets={"eval_dataset": folders["val"]})
    val = load_spec(job.path / "spec.yaml")["dataset"]["val_data_sources"]
    assert val == {"image_dir": f"{folders['val'].resolve()}/images.tar.gz", "json_file": other}


@pytest.mark.parametrize("datasets,message", [
    ({"test_dataset": "val"}, "dataset role 'test_dataset': this action takes eval_dataset, train_datasets"),
    ({"eval_dataset": ["val", "val"]}, "takes one dataset; got 2"),
    ({"eval_dataset": "nowhere"}, "nowhere: not a folder"),
    ({"eval_dataset": "train"}, "holds no annotations.json"),
])
def test_bad_datasets_are_named_and_nothing_is_written(workspace, tiny_data, tmp_path, monkeypatch, datasets,
                                                        message):
    _role_folders(tiny_data, tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SkillBankError, match=message):
        SkillBank(workspace).create_job("train", tiny_data["spec"], automl_policy="off", start=False,
                                        datasets=datasets)
    assert not (workspace / "jobs").exists() or not list((workspace / "jobs").iterdir())


def test_cli_option(workspace, tiny_data, tmp_path, capsys):
    folders = _role_folders(tiny_data, tmp_path)
    assert cli(["--workspace", str(workspace), "job", "create", "--action", "train", "--dataset", "eval_dataset",
                "--automl-policy", "off"]) == 2
    assert "expected ROLE=PATH" in capsys.readouterr().err
    assert cli(["--workspace", str(workspace), "job", "create", "--action", "evaluate",
                "--dataset", f"inference_dataset={folders['val']}"]) == 2
    assert "this action takes eval_dataset" in capsys.readouterr().err
    assert not (workspace / "jobs").exists() or not list((workspace / "jobs").iterdir())


def test_s3_dataset_folders_are_listed_at_creation(workspace, tiny_data, tmp_path, s3):
    folders = _role_folders(tiny_data, tmp_path)
    for path in folders["val"].iterdir():
        s3.put_object(Bucket=BUCKET, Key=f"ds/val/{path.name}", Body=path.read_bytes())
    for path in folders["train"].rglob("*"):
        if path.is_file():
            s3.put_object(Bucket=BUCKET, Key=f"ds/train/{path.relative_to(folders['train'])}",
                          Body=path.read_bytes())
    job = SkillBank(workspace).create_job(
        "train", automl_policy="off", start=False,
        datasets={"train_datasets": f"s3://{BUCKET}/ds/train/", "eval_dataset": f"s3://{BUCKET}/ds/val"})
    data = load_spec(job.path / "spec.yaml")["dataset"]
    assert data["train_data_sources"] == [{"image_dir": f"s3://{BUCKET}/ds/train/images",
                                           "json_file": f"s3://{BUCKET}/ds/train/annotations_odvg.jsonl",
                                           "label_map": f"s3://{BUCKET}/ds/train/annotations_odvg_labelmap.json",
                                           "sampling_weight": 1.0}]
    assert data["val_data_sources"] == {"image_dir": f"s3://{BUCKET}/ds/val/images.tar.gz",
                                        "json_file": f"s3://{BUCKET}/ds/val/annotations.json"}
    s3.put_object(Bucket=BUCKET, Key="ds/empty/readme.txt", Body=b"x")
    with pytest.raises(SkillBankError, match=r"ds/empty: holds no images.tar.gz or images/, no annotations.json"):
        SkillBank(workspace).create_job("train", tiny_data["spec"], automl_policy="off", start=False,
                                        datasets={"eval_dataset": f"s3://{BUCKET}/ds/empty"})


BUCKET = "skillbank-datasets"


@pytest.fixture
def s3(monkeypatch):
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "AKIATESTKEYNOTREAL42",
                       "AWS_SECRET_ACCESS_KEY": "not/a/real/secret", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def test_the_skill_text_names_the_option_and_every_role():
    from sdk.skill_info import load_skill_info
    skill = (Path(__file__).resolve().parents[1] / "skills" / "grounding-dino" / "SKILL.md").read_text()
    assert "--dataset ROLE=PATH" in skill and "datasets=" in skill
    roles = {source.source for action in load_skill_info().actions.values() for source in action.data_sources.values()}
    assert roles == {"train_datasets", "eval_dataset", "inference_dataset", "calibration_dataset"}
    assert all(f"`{role}`" in skill for role in roles)
