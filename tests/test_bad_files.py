"""Structurally wrong annotation files get a message naming the file, the JSON path, what was found and what is
expected, through preflight (`skillbank preflight`-style check) and the `skillbank data` CLI (exit 2) alike; loading
is bounded (deep nesting, huge lines, oversized files)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grounding_dino.formats import files as format_files
from grounding_dino.formats import read_coco, read_label_map, read_odvg
from grounding_dino.formats.files import MAX_JSON_DEPTH, FormatError
from sdk import data_convert
from sdk.data_files import DataToolError
from sdk.preflight import PreflightError, check
from sdk.skill_info import load_skill_info
from sdk.spec import resolve_spec

REPO = Path(__file__).resolve().parents[1]
IMAGE = {"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}
ANNOTATION = {"id": 7, "image_id": 1, "category_id": 0, "bbox": [1, 1, 4, 4]}
CATEGORIES = [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]


def coco(**changes) -> dict:
    return {"images": [IMAGE], "annotations": [ANNOTATION], "categories": CATEGORIES, **changes}


COCO_CASES = {
    "annotations-of-strings": (coco(annotations=["x"]),
                               'annotations[0]: found the string "x"; expected an object with \'image_id\''),
    "annotations-of-lists": (coco(annotations=[[1, 2]]), "annotations[0]: found a list [1, 2]; expected an object"),
    "annotations-not-a-list": (coco(annotations={"a": 1}), "annotations: found an object {'a': 1}; expected a list"),
    "image-is-a-string": (coco(images=["a.jpg"]), 'images[0]: found the string "a.jpg"; expected an object'),
    "category-not-an-object": (coco(categories=["cat"]), 'categories[0]: found the string "cat"; expected an object'),
    "category-id-a-string": (coco(categories=[{"id": "0", "name": "cat"}]),
                             'categories[0].id: found the string "0"; expected an integer'),
    "annotation-category-id-a-string": (coco(annotations=[{**ANNOTATION, "category_id": "0"}]),
                                        'annotations[0].category_id (id 7): found the string "0"; expected the id of '
                                        "a category in 'categories' ([0, 1])"),
    "annotation-image-id-a-list": (coco(annotations=[{**ANNOTATION, "image_id": [1]}]),
                                   "annotations[0].image_id (id 7): found a list [1]; expected the id of an image"),
    "image-id-a-list": (coco(images=[{**IMAGE, "id": [1]}]), "images[0].id: found a list [1]; expected an integer"),
    "image-height-a-string": (coco(images=[{**IMAGE, "height": "x"}]),
                              'images[0].height: found the string "x"; expected a positive integer'),
    "bbox-missing": (coco(annotations=[{k: v for k, v in ANNOTATION.items() if k != "bbox"}]),
                     "annotations[0].bbox (id 7): missing; expected 4 finite numbers"),
    "bbox-infinite": (coco(annotations=[{**ANNOTATION, "bbox": [1e400, 1, 4, 4]}]),
                      "annotations[0].bbox (id 7): found a list [inf, 1, 4, 4]; expected 4 finite numbers"),
    "iscrowd-a-string": (coco(annotations=[{**ANNOTATION, "iscrowd": "no"}]),
                         'annotations[0].iscrowd (id 7): found the string "no"; expected 0 or 1'),
}


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def preflight_error(tmp_path: Path, action: str, spec: dict) -> str:
    (tmp_path / "images").mkdir(exist_ok=True)
    info = load_skill_info().action(action)
    resolved = resolve_spec(action, {"results_dir": str(tmp_path / "results"), **spec})
    with pytest.raises(PreflightError) as caught:
        check(resolved, action, info.inputs, info.data_sources, warn=lambda _: None)
    return str(caught.value)


def data_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", "data", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name", sorted(COCO_CASES))
def test_wrong_coco_is_named_by_preflight_and_the_data_tools(name, tmp_path):
    data, words = COCO_CASES[name]
    path = write(tmp_path / f"{name}.json", data)
    message = preflight_error(tmp_path, "evaluate", {
        "evaluate": {"checkpoint": str(path)},
        "dataset": {"test_data_sources": {"image_dir": str(tmp_path / "images"), "json_file": str(path)}}})
    assert "coco_invalid dataset.test_data_sources.json_file" in message and str(path) in message
    assert words in message, message
    for tool in (data_convert.coco_to_odvg, data_convert.make_contiguous):
        with pytest.raises(DataToolError) as caught:
            tool(path)
        assert str(caught.value).startswith(f"{path} {words}"), str(caught.value)


def test_nan_boxes_are_refused_and_counted_by_coco2odvg(tmp_path):
    annotations = [{**ANNOTATION, "id": i, "bbox": [float("nan"), 1, 4, 4] if i % 2 else [1, 1, 4, 4]}
                   for i in range(10)]
    path = write(tmp_path / "nan.json", coco(annotations=annotations))
    with pytest.raises(DataToolError, match=r"annotations\[1\]\.bbox \(id 1\): found a list \[nan, 1, 4, 4\]; "
                                            r"expected 4 finite numbers .*; 5 annotations have such a bbox"):
        data_convert.coco_to_odvg(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_data_cli_exits_2_with_the_message_and_no_traceback(tmp_path):
    path = write(tmp_path / "bad.json", coco(annotations=[{**ANNOTATION, "image_id": [1]}]))
    for tool in ("coco2odvg", "contiguous", "stats"):
        done = data_cli(tool, str(path))
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert f"{path} annotations[0].image_id (id 7): found a list [1]" in done.stderr


ODVG_LINE = {"file_name": "a.jpg", "height": 10, "width": 10,
             "detection": {"instances": [{"bbox": [1, 1, 4, 4], "label": 0}]}}
ODVG_CASES = {
    "detection-a-list": ({**ODVG_LINE, "detection": ["x"]},
                         "line 1 detection: found a list ['x']; expected an object holding the 'instances' list"),
    "instances-of-strings": ({**ODVG_LINE, "detection": {"instances": ["x"]}},
                             'line 1 detection.instances[0]: found the string "x"; expected an object'),
    "label-a-string": ({**ODVG_LINE, "detection": {"instances": [{"bbox": [1, 1, 4, 4], "label": "0"}]}},
                       'line 1 detection.instances[0].label: found the string "0"; expected an integer label'),
    "bbox-nan": ({**ODVG_LINE, "detection": {"instances": [{"bbox": [float("nan"), 1, 4, 4], "label": 0}]}},
                 "line 1 detection.instances[0].bbox: found a list [nan, 1, 4, 4]; expected 4 finite numbers"),
    "record-a-string": ("a.jpg", 'line 1: found the string "a.jpg"; expected a JSON object'),
}


@pytest.mark.parametrize("name", sorted(ODVG_CASES))
def test_wrong_odvg_is_named_by_preflight_and_the_data_tools(name, tmp_path):
    record, words = ODVG_CASES[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_text(json.dumps(record) + "\n")
    label_map = write(tmp_path / "labelmap.json", {"0": "cat"})
    val = write(tmp_path / "val.json", coco())
    message = preflight_error(tmp_path, "train", {"dataset": {
        "train_data_sources": [{"image_dir": str(tmp_path / "images"), "json_file": str(path),
                                "label_map": str(label_map)}],
        "val_data_sources": {"image_dir": str(tmp_path / "images"), "json_file": str(val)}}})
    assert f"odvg_invalid dataset.train_data_sources[0].json_file [{path}:1]" in message
    assert words.split(" ", 2)[2] in message, message
    with pytest.raises(DataToolError) as caught:
        data_convert.odvg_to_coco(path, label_map)
    assert str(caught.value).startswith(f"{path} {words}"), str(caught.value)


@pytest.mark.parametrize("key", ["²", "١", "1.5", " 1", "x"])
def test_label_map_key_that_is_not_ascii_digits_is_named(key, tmp_path):
    label_map = write(tmp_path / "labelmap.json", {"0": "cat", key: "dog"})
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(json.dumps(ODVG_LINE) + "\n")
    words = f"[{json.dumps(key, ensure_ascii=False)}]: found the string {json.dumps(key, ensure_ascii=False)}; " \
            "expected an integer label written in ASCII digits"
    with pytest.raises(FormatError) as caught:
        read_label_map(label_map)
    assert str(caught.value) == f"{label_map} {words}, e.g. \"0\""
    done = data_cli("odvg2coco", str(jsonl), "--label-map", str(label_map))
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr
    message = preflight_error(tmp_path, "train", {"dataset": {
        "train_data_sources": [{"image_dir": str(tmp_path / "images"), "json_file": str(jsonl),
                                "label_map": str(label_map)}],
        "val_data_sources": {"image_dir": str(tmp_path / "images"), "json_file": str(write(tmp_path / "v.json",
                                                                                           coco()))}}})
    assert "label_map_invalid dataset.train_data_sources[0].label_map" in message and words in message


def test_label_given_twice_is_named(tmp_path):
    with pytest.raises(FormatError, match=r"keys '1' and '01' are both label 1; expected each label once"):
        read_label_map(write(tmp_path / "labelmap.json", {"0": "a", "1": "b", "01": "c"}))


# ---------------------------------------------------------------------------------------------------------------
# bounded loading


@pytest.mark.timeout(60)  # parsing 100,000 levels by recursion would crash or crawl: it must stop at the limit
def test_deep_json_is_refused_before_parsing_it_deep(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + ', "annotations": [], "categories": []}')
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps(coco(annotations=[{**ANNOTATION, "extra": json.loads("[" * 100 + "]" * 100)}])))
    lines = tmp_path / "deep.jsonl"
    lines.write_text(json.dumps(ODVG_LINE) + "\n" + "[" * 5000 + "]" * 5000 + "\n")
    for read, path, where in ((read_coco, deep, ""), (read_coco, nested, ""), (lambda p: list(read_odvg(p)), lines,
                                                                              " line 2")):
        with pytest.raises(FormatError) as caught:
            read(path)
        assert str(caught.value) == f"{path}{where}: refused: values nest deeper than the limit of {MAX_JSON_DEPTH} " \
                                    "levels (a COCO file nests 5, an ODVG record 5)"


def test_huge_jsonl_line_and_oversized_json_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(format_files, "MAX_LINE_BYTES", 1000)
    lines = tmp_path / "long.jsonl"
    lines.write_text(json.dumps(ODVG_LINE) + "\n" + json.dumps({**ODVG_LINE, "pad": "x" * 2000}) + "\n")
    with pytest.raises(FormatError, match=r"long\.jsonl line 2: refused: the line is longer than the limit of 1,000"):
        list(read_odvg(lines))
    path = write(tmp_path / "val.json", coco())
    monkeypatch.setenv(format_files.MAX_JSON_BYTES_ENV, "100")
    with pytest.raises(DataToolError, match=r"val\.json: refused: the file is larger than the limit of 100 bytes .*"
                                            "SKILLBANK_MAX_JSON_BYTES"):
        data_convert.coco_to_odvg(path)
    monkeypatch.setenv(format_files.MAX_JSON_BYTES_ENV, "0")  # no limit
    assert read_coco(path)["images"] == [IMAGE]
