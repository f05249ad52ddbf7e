"""Property: whatever a COCO file, an ODVG file or a label map holds (wrong types, missing keys, NaN, infinite and
negative boxes, unicode digits, junk entries), preflight, the converters, the statistics, the format readers and the
training record builders either succeed or raise a user-facing error with a message; never another exception.

Examples are generated from a fixed seed without a database (derandomize), so CI runs the same files every time.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grounding_dino.data.coco import coco_records
from grounding_dino.data.errors import BoxAudit
from grounding_dino.data.odvg import label_names, odvg_records
from grounding_dino.errors import UserError
from grounding_dino.formats import FormatError, read_coco, read_label_map, read_odvg
from sdk import data_convert, data_stats, preflight
from sdk.errors import SkillBankError
from sdk.skill_info import load_skill_info
from sdk.spec import resolve_spec

EXAMPLES = 500
PROFILE = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLEAN = (SkillBankError, UserError, FormatError)

ROOT = Path(tempfile.mkdtemp(prefix="hypothesis_formats_"))
IMAGES = ROOT / "images"
IMAGES.mkdir()
(IMAGES / "a.jpg").write_bytes(b"not decoded here")
COCO_FILE, ODVG_FILE, LABEL_MAP = ROOT / "data.json", ROOT / "data.jsonl", ROOT / "labelmap.json"
GOOD_VAL = ROOT / "val.json"
GOOD_VAL.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
                                "annotations": [], "categories": [{"id": 0, "name": "cat"}]}))
GOOD_ODVG = ROOT / "good.jsonl"
GOOD_ODVG.write_text(json.dumps({"file_name": "a.jpg", "height": 10, "width": 10,
                                 "detection": {"instances": [{"bbox": [1, 1, 4, 4], "label": 0}]}}) + "\n")

# ---------------------------------------------------------------------------------------------------------------
# values: right ones, and every kind of wrong one

DIGITS = ["0", "1", "2", "01", "-1", "²", "١", "٣", "1.5", " 1", "1e3", "x", "", "9" * 30]
junk = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(DIGITS) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
number = st.one_of(st.integers(-20, 200), st.floats(-20, 200), st.sampled_from([float("nan"), float("inf"), -1e400,
                                                                                 10 ** 400, 1e300]))
box = st.one_of(st.lists(number, min_size=4, max_size=4), st.lists(number, max_size=6), junk)
ident = st.one_of(st.integers(-2, 4), st.sampled_from(["0", "1", True, None, [1], 2 ** 64, 1.0]), junk)
side = st.one_of(st.integers(1, 50), st.sampled_from([0, -5, "10", 10.0, None, True, 10 ** 7]))
name = st.one_of(st.sampled_from(["cat", "dog", "traffic light", " Cat ", ""]), st.text(max_size=10), junk)


names = st.lists(st.sampled_from(["cat", "dog", "traffic light", "person", "red car"]), min_size=1, max_size=4,
                 unique=True)
coordinate = st.floats(-20, 200, allow_nan=False)  # negative and inverted boxes are valid input: training drops them


@st.composite
def good_coco(draw):
    image_ids = list(range(1, draw(st.integers(1, 3)) + 1))
    labels = draw(names)
    category_ids = draw(st.sampled_from([list(range(len(labels))), [1, 3, 7, 9][: len(labels)]]))
    return {
        "images": [{"id": i, "file_name": "a.jpg", "height": draw(st.integers(1, 64)),
                    "width": draw(st.integers(1, 64))} for i in image_ids],
        "annotations": [{"id": n, "image_id": draw(st.sampled_from(image_ids)),
                         "category_id": draw(st.sampled_from(category_ids)),
                         "bbox": draw(st.lists(coordinate, min_size=4, max_size=4)),
                         "iscrowd": draw(st.sampled_from([0, 0, 1]))} for n in range(draw(st.integers(0, 5)))],
        "categories": [{"id": i, "name": n} for i, n in zip(category_ids, labels)],
    }


@st.composite
def good_odvg(draw):
    labels = draw(names)
    records = []
    for _ in range(draw(st.integers(1, 3))):
        regions = [{"bbox": draw(st.lists(coordinate, min_size=4, max_size=4)),
                    "label": draw(st.integers(0, len(labels) - 1))} for _ in range(draw(st.integers(0, 4)))]
        if draw(st.booleans()):
            body = {"detection": {"instances": [dict(r, category=labels[r["label"]]) for r in regions]}}
        else:
            body = {"grounding": {"caption": "", "regions": [{"bbox": r["bbox"], "phrase": labels[r["label"]]}
                                                            for r in regions]}}
        records.append({"file_name": "a.jpg", "height": draw(st.integers(1, 64)), "width": draw(st.integers(1, 64)),
                        **body})
    return {"records": records, "label_map": {str(i): n for i, n in enumerate(labels)}}


def _slots(node, out):
    """Every (container, key or index) of a JSON document: the places a corruption can hit."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        out.append((node, key))
        _slots(value, out)
    return out


@st.composite
def corrupted(draw, good):
    """A valid document with up to three values replaced by junk, NaN, unicode digits or wrong ids, or removed."""
    doc = draw(good)
    for _ in range(draw(st.integers(0, 3))):
        slots = _slots(doc, [])
        if not slots:
            break
        parent, key = draw(st.sampled_from(slots))
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = draw(st.one_of(junk, number, ident, side, name, box))
    return doc


coco = st.one_of(corrupted(good_coco()), corrupted(good_coco()), corrupted(good_coco()), junk)
odvg = corrupted(good_odvg())
odvg_junk_lines = st.lists(st.one_of(junk.map(json.dumps), st.sampled_from(["", "{oops", "[["])), max_size=2)
label_map = st.one_of(st.dictionaries(st.sampled_from(DIGITS) | st.text(max_size=3), name, max_size=4), junk)


def write(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False) if not isinstance(data, str) else data, encoding="utf-8")


def clean(call, *args):
    """The call's result, or None after a user-facing error that has a message; any other exception fails."""
    try:
        return call(*args)
    except CLEAN as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return None


def _spec(action: str, spec: dict) -> tuple:
    info = load_skill_info().action(action)
    return resolve_spec(action, {"results_dir": str(ROOT / "results"), **spec}), info


EVALUATE = _spec("evaluate", {"evaluate": {"checkpoint": str(GOOD_VAL)}, "dataset": {"test_data_sources": {
    "image_dir": str(IMAGES), "json_file": str(COCO_FILE)}}})
TRAIN_COCO = _spec("train", {"dataset": {
    "train_data_sources": [{"image_dir": str(IMAGES), "json_file": str(COCO_FILE)}],
    "val_data_sources": {"image_dir": str(IMAGES), "json_file": str(GOOD_VAL)}}})
TRAIN_ODVG = _spec("train", {"dataset": {
    "train_data_sources": [{"image_dir": str(IMAGES), "json_file": str(ODVG_FILE), "label_map": str(LABEL_MAP)}],
    "val_data_sources": {"image_dir": str(IMAGES), "json_file": str(GOOD_VAL)}}})
TRAIN_GROUNDING = _spec("train", {"dataset": {
    "train_data_sources": [{"image_dir": str(IMAGES), "json_file": str(ODVG_FILE)}],
    "val_data_sources": {"image_dir": str(IMAGES), "json_file": str(GOOD_VAL)}}})


def run_preflight(resolved_and_info) -> None:
    resolved, info = resolved_and_info
    clean(preflight.check, resolved, info.name, info.inputs, info.data_sources, None, "submit", lambda _: None)


@PROFILE
@given(coco)
def test_any_coco_file_gives_a_result_or_a_message(data):
    write(COCO_FILE, data)
    clean(read_coco, COCO_FILE)
    clean(data_convert.coco_to_odvg, COCO_FILE, ROOT / "out")
    clean(data_convert.make_contiguous, COCO_FILE, ROOT / "out" / "contiguous.json")
    clean(data_stats.dataset_stats, COCO_FILE)
    run_preflight(EVALUATE)
    run_preflight(TRAIN_COCO)
    for contiguous in (True, False):
        clean(coco_records, str(COCO_FILE), str(IMAGES), BoxAudit(), 0, contiguous)


@PROFILE
@given(odvg, odvg_junk_lines)
def test_any_odvg_file_gives_a_result_or_a_message(data, junk_lines):
    records = data.get("records") if isinstance(data, dict) else data
    lines = [json.dumps(r, ensure_ascii=False) for r in records] if isinstance(records, list) else [json.dumps(data)]
    ODVG_FILE.write_text("\n".join(lines + junk_lines) + "\n", encoding="utf-8")
    write(LABEL_MAP, data.get("label_map", {}) if isinstance(data, dict) else data)
    clean(lambda: list(read_odvg(ODVG_FILE)))
    clean(data_convert.odvg_to_coco, ODVG_FILE, None, ROOT / "out" / "coco.json")
    clean(data_convert.odvg_to_coco, ODVG_FILE, LABEL_MAP, ROOT / "out" / "coco.json")
    clean(data_stats.dataset_stats, ODVG_FILE)
    clean(data_stats.dataset_stats, ODVG_FILE, LABEL_MAP)
    run_preflight(TRAIN_ODVG)
    run_preflight(TRAIN_GROUNDING)
    names = clean(label_names, str(LABEL_MAP), "dataset.train_data_sources[0]")
    clean(odvg_records, str(ODVG_FILE), str(IMAGES), names, BoxAudit(), "dataset.train_data_sources[0]", 0)


@PROFILE
@given(st.one_of(label_map, corrupted(good_odvg().map(lambda d: d["label_map"]))))
def test_any_label_map_gives_a_result_or_a_message(labels):
    write(LABEL_MAP, labels)
    ODVG_FILE.write_text(GOOD_ODVG.read_text(), encoding="utf-8")
    result = clean(read_label_map, LABEL_MAP)
    if result is not None:  # what is accepted is what the format says: integer labels, non-empty names
        assert all(isinstance(k, int) and isinstance(v, str) and v.strip() for k, v in result.items())
        assert all(str(k) in labels or any(int(key) == k for key in labels) for k in result)
    clean(label_names, str(LABEL_MAP), "dataset.train_data_sources[0]")
    clean(data_convert.odvg_to_coco, ODVG_FILE, LABEL_MAP, ROOT / "out" / "coco.json")
    clean(data_stats.dataset_stats, ODVG_FILE, LABEL_MAP)
    run_preflight(TRAIN_ODVG)
