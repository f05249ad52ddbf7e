"""S3 data sources against a real loopback S3 endpoint (moto's server on 127.0.0.1), in and across processes."""
from __future__ import annotations

import io
import json
import socket
import tarfile

import pytest

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from sdk.data_sources import DataSourceError, fetch_s3  # noqa: E402
from sdk.jobs import SkillBank  # noqa: E402

ACCESS_KEY = "AKIATESTKEYNOTREAL42"
SECRET_KEY = "secret/NotReal+Test+Value+0123456789abcd"
BUCKET = "skillbank-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port())
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                       "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def test_prefix_download_pages_and_caches(s3, tmp_path):
    for i in range(25):
        s3.put_object(Bucket=BUCKET, Key=f"ds/images/{i:04d}.jpg", Body=b"x")
    s3.put_object(Bucket=BUCKET, Key="ds/annotations.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="dsother/not_this.txt", Body=b"no")
    folder = fetch_s3(f"s3://{BUCKET}/ds", tmp_path / "cache", log=lambda _: None, page_size=10)  # 3 pages
    assert folder == tmp_path / "cache" / "s3" / BUCKET / "ds"
    assert len(list((folder / "images").iterdir())) == 25 and (folder / "annotations.json").read_bytes() == b"{}"
    assert not (folder.parent / "dsother").exists()
    mtime = (folder / "annotations.json").stat().st_mtime_ns
    assert fetch_s3(f"s3://{BUCKET}/ds/", tmp_path / "cache", log=lambda _: None) == folder
    assert (folder / "annotations.json").stat().st_mtime_ns == mtime  # cached: not downloaded again
    single = fetch_s3(f"s3://{BUCKET}/ds/annotations.json", tmp_path / "cache2", log=lambda _: None)
    assert single.read_bytes() == b"{}"


@pytest.mark.parametrize("key", ["ds/../../escape.txt", "ds//root.txt", "ds/a/../../../escape.txt"])
def test_keys_escaping_the_destination_are_refused(s3, tmp_path, key):
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"evil")
    with pytest.raises(DataSourceError, match="outside"):
        fetch_s3(f"s3://{BUCKET}/ds", tmp_path / "cache", log=lambda _: None)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "cache" / "escape.txt").exists()


def test_missing_object_is_a_clear_error(s3, tmp_path):
    with pytest.raises(DataSourceError, match="S3 request failed") as err:
        fetch_s3(f"s3://{BUCKET}/nothing/here.json", tmp_path / "cache", log=lambda _: None)
    assert SECRET_KEY not in str(err.value) and ACCESS_KEY not in str(err.value)


def test_job_child_fetches_through_the_endpoint(s3, workspace, tiny_data):
    """The job's child process downloads the data (archive included) from the loopback endpoint; its runtime
    preflight then sees the real files, and no credential appears in the job folder."""
    root = tiny_data["root"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(root / "images", arcname="images")
    s3.put_object(Bucket=BUCKET, Key="train/images.tar.gz", Body=buffer.getvalue())
    s3.put_object(Bucket=BUCKET, Key="train/annotations_odvg.jsonl", Body=(root / "train_odvg.jsonl").read_bytes())
    s3.put_object(Bucket=BUCKET, Key="train/labelmap.json", Body=(root / "labelmap.json").read_bytes())
    val = json.loads((root / "val.json").read_text())
    for category in val["categories"]:
        category["id"] += 1  # 1-based ids: only visible once the file is fetched
    s3.put_object(Bucket=BUCKET, Key="val/annotations.json", Body=json.dumps(val).encode())
    spec = {"dataset": {
        "train_data_sources": [{"image_dir": f"s3://{BUCKET}/train/images.tar.gz",
                                "json_file": f"s3://{BUCKET}/train/annotations_odvg.jsonl",
                                "label_map": f"s3://{BUCKET}/train/labelmap.json"}],
        "val_data_sources": {"image_dir": f"s3://{BUCKET}/train/images.tar.gz",
                             "json_file": f"s3://{BUCKET}/val/annotations.json"},
    }}
    bank = SkillBank(workspace)
    job = bank.wait(bank.create_job("train", spec=spec, automl_policy="off").id, timeout=60)
    assert job.status == "error" and "category_ids dataset.val_data_sources.json_file" in job.error
    cache = workspace / "cache"
    assert (cache / "s3" / BUCKET / "val" / "annotations.json").is_file()
    extracted = list((cache / "archives").iterdir())
    assert len(extracted) == 1 and (extracted[0] / "images" / "a.jpg").is_file()
    log = bank.logs(job.id)
    assert "extracted" in log and f"s3://{BUCKET}/val/annotations.json" in log
    for path in job.path.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert ACCESS_KEY.encode() not in text and SECRET_KEY.encode() not in text, path
