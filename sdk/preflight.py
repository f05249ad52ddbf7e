"""Preflight: catch the known ways a Grounding DINO job fails, before it spends minutes loading a model.

Each finding has a code, the spec key, the file and line when there is one, and the fix. Errors stop a job
(exit 2); warnings are printed. The SDK runs this when a job is created ("submit": s3:// data is not fetched yet
and archives are still to be extracted) and the job's child runs it again on the fetched data ("runtime").
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from grounding_dino.formats import (FormatError, NotJson, TokenCounter, caption_tokens, check_coco, coco_categories,
                                    load_coco, minilm_folder, normalize_name, read_label_map, read_odvg)
from grounding_dino.model.hub import looks_like_id
from sdk.data_sources import data_source_keys, is_archive, is_s3
from sdk.errors import SkillBankError
from sdk.spec import expand_key, get_path

POSITIVE_MAP_WIDTH = 256  # the width public checkpoints (and TAO's positive maps) are built with


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # "error" or "warning"
    key: str
    message: str
    fix: str
    file: Optional[str] = None
    line: Optional[int] = None

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "") if self.file else ""
        at = f" [{where}]" if where else ""
        return f"{self.severity.upper()} {self.code} {self.key}{at}: {self.message} Fix: {self.fix}"


class PreflightError(SkillBankError):
    def __init__(self, findings: list[Finding]):
        self.findings = findings
        errors = [f for f in findings if f.severity == "error"]
        super().__init__("preflight found problems:\n" + "\n".join(f"  {f}" for f in errors))


def _error(code, key, message, fix, file=None, line=None) -> Finding:
    return Finding(code, "error", key, message, fix, str(file) if file else None, line)


def _warning(code, key, message, fix, file=None, line=None) -> Finding:
    return Finding(code, "warning", key, message, fix, str(file) if file else None, line)


# ---------------------------------------------------------------------------------------------------------------
# reading annotation files (grounding_dino.formats: the readers training uses) and counting tokens without torch


class _Unreadable(Exception):
    def __init__(self, finding: Finding):
        self.finding = finding


def _at(error: FormatError) -> str:
    """The JSON path of the problem inside the file or line, as a prefix ("detection.instances[0].bbox: ")."""
    return f"{error.json_path}: " if error.json_path else ""


def _unreadable(error: NotJson, key: str, fix: str) -> _Unreadable:
    return _Unreadable(_error("json_unreadable", key, f"{'line is ' if error.line else ''}{error.problem}.", fix,
                              error.path, error.line))


@lru_cache(maxsize=8)
def _counter(text_encoder_type: str) -> TokenCounter:
    """The text encoder's tokenizer (exact counts), or an estimate when no vocabulary is found."""
    candidates = [Path(text_encoder_type)]
    if text_encoder_type == "minilm":
        candidates = [minilm_folder()]
    else:
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                            "huggingface")) / "hub")
        candidates += sorted((hub / f"models--{text_encoder_type.replace('/', '--')}" / "snapshots").glob("*"))
    for folder in candidates:
        if folder and folder.is_dir() and (counter := TokenCounter.from_folder(folder)) is not None:
            return counter
    # all-MiniLM-L6-v2 ships bert-base-uncased's WordPiece vocabulary: a close estimate for uncased BERTs.
    minilm = minilm_folder()
    if "uncased" in text_encoder_type and minilm is not None and minilm.is_dir():
        return TokenCounter.from_folder(minilm, exact=False) or TokenCounter.estimate()
    return TokenCounter.estimate()


# ---------------------------------------------------------------------------------------------------------------
# the checks


@dataclass
class _Dataset:
    """What the checks need from one annotation file."""

    names: list[str]
    max_boxes: int
    max_boxes_where: tuple[Optional[str], Optional[int]]


def _check_paths(spec: dict, inputs: dict, data_keys: dict, stage: str) -> list[Finding]:
    findings = []
    for pattern, decl in inputs.items():
        kind = decl.type
        if kind == "list" and pattern not in data_keys:
            continue  # a list of sections or of captions, not of paths
        extracted = pattern in data_keys and data_keys[pattern].runtime == "extracted_folder"
        for key, value in expand_key(spec, pattern):
            values = value if kind == "list" and isinstance(value, list) else [value]
            for item in values:
                if not isinstance(item, str) or not item or (is_s3(item) and stage == "submit"):
                    continue
                findings += _check_path(key, item, "folder" if kind == "list" else kind, extracted, stage)
    return findings


def _check_path(key: str, value: str, kind: str, extracted: bool, stage: str) -> list[Finding]:
    path = Path(value)
    if is_s3(value):
        return [_error("path_not_fetched", key, f"{value} was not fetched.", "check the S3 URI.")]
    if kind == "model" and not path.exists():
        if looks_like_id(value, allow_file=True):
            return []  # a Hugging Face id: the backend's pre-check fetches it, with the hub's own errors
        return [_error("path_missing", key, f"{value} does not exist here and is not a Hugging Face model id.",
                       f"point {key} at an existing checkpoint file or GroundingDino folder, or give a Hugging Face "
                       "id such as IDEA-Research/grounding-dino-tiny (or org/name/file.pth).")]
    if not path.exists():
        return [_error("path_missing", key, f"{value} does not exist.", f"point {key} at an existing {kind}.")]
    if kind == "folder" and not path.is_dir():
        if is_archive(value) and extracted and stage == "submit":
            return []
        if is_archive(value):
            how = ("the job extracts archives only for the keys skill_info marks runtime: extracted_folder"
                   if not extracted else "extract it and point the key at the folder")
            return [_error("image_dir_is_archive", key, f"{value} is an archive, not a folder.", how + ".")]
        return [_error("image_dir_is_file", key, f"{value} is a file, not a folder.",
                       f"point {key} at the folder that holds the images.")]
    if kind == "file" and not path.is_file():
        return [_error("path_not_file", key, f"{value} is a folder, not a file.", f"point {key} at the file.")]
    return []


def _coco(path: Path, key: str, findings: list[Finding], check_ids: bool) -> Optional[_Dataset]:
    try:
        data = load_coco(path)
        categories = coco_categories(data, path)
        ids = [c["id"] for c in categories]
        if check_ids and ids != list(range(len(ids))):
            shown = ids[:10] + (["..."] if len(ids) > 10 else [])
            findings.append(_error(
                "category_ids", key, f"category ids are {shown}; they must be 0..{len(ids) - 1} (0-based, "
                "contiguous): predicted labels index the category list and validation looks positive maps up by id.",
                "renumber categories to 0..N-1 in file order and remap every annotation's category_id.", path))
            return None  # annotations naming the old ids are part of that one fix, so they are not checked yet
        check_coco(data, path)
    except NotJson as exc:
        raise _unreadable(exc, key, "repair the file (is it truncated, or JSON lines given as .json?).")
    except FormatError as exc:
        findings.append(_error("coco_invalid", key, f"{exc.place + ': ' if exc.place else ''}{exc.problem}.",
                               "give COCO JSON with images, annotations and categories.", path))
        return None
    per_image = Counter(a["image_id"] for a in data["annotations"])
    densest = per_image.most_common(1)
    return _Dataset([c["name"] for c in categories], densest[0][1] if densest else 0, (str(path), None))


def _odvg(path: Path, key: str, label_map_key: str, label_map: Optional[str], findings: list[Finding],
          text_encoder_type: str, max_text_len: int) -> Optional[_Dataset]:
    names: dict[int, str] = {}
    if label_map:
        try:
            names = dict(sorted(read_label_map(label_map).items()))
        except NotJson as exc:
            raise _unreadable(exc, label_map_key, "repair the label map.")
        except FormatError as exc:
            findings.append(_error("label_map_invalid", label_map_key, f"{_at(exc)}{exc.problem}.",
                                   "write the label map as {\"0\": \"name\", \"1\": \"name\", ...}.", label_map))
            return None
        if list(names) != list(range(len(names))):
            findings.append(_error("label_map_invalid", label_map_key, "keys must be the strings \"0\"..\"N-1\".",
                                   "write the label map as {\"0\": \"name\", \"1\": \"name\", ...}.", label_map))
            return None
    max_boxes, where = 0, (str(path), None)
    long_phrases: list[tuple[int, list[str]]] = []
    try:
        for record in read_odvg(path):
            number, kind, items = record.line, record.kind, record.regions
            if kind == "detection" and not label_map:
                findings.append(_error("label_map_missing", label_map_key,
                                       "detection ODVG needs a label map (its absence selects grounding mode).",
                                       f"set {label_map_key} to the *_odvg_labelmap.json file.", path, number))
                return None
            if kind == "grounding" and label_map:
                findings.append(_error("label_map_unexpected", label_map_key,
                                       "grounding ODVG lines, but a label map is set (that selects detection mode).",
                                       f"remove {label_map_key} for grounding data.", path, number))
                return None
            if kind == "detection":
                for item in items:
                    if item["label"] not in names:
                        findings.append(_error(
                            "label_not_in_map", key, f"label {item['label']!r} is not in the label map.",
                            f"add it to {label_map} or fix the line.", path, number))
                        return None
            else:
                long_phrases.append((number, sorted({normalize_name(r["phrase"]) for r in items})))
            if len(items) > max_boxes:
                max_boxes, where = len(items), (str(path), number)
    except NotJson as exc:
        raise _unreadable(exc, key, "fix or remove that line (one JSON object per line).")
    except FormatError as exc:
        findings.append(_error("odvg_invalid", key, f"{_at(exc)}{exc.problem}.",
                               "write ODVG lines (detection.instances or grounding.regions).", path, exc.line))
        return None
    for number, phrases in long_phrases:
        counter = _counter(text_encoder_type)
        tokens = caption_tokens(counter.costs(phrases))
        if tokens > max_text_len:
            make = _error if counter.exact else _warning
            findings.append(make("caption_too_long", key,
                                 f"the caption of this image's phrases takes {tokens} tokens "
                                 f"{'' if counter.exact else '(estimated) '}> model.max_text_len={max_text_len}; "
                                 "phrases past the limit can never be matched.",
                                 "split the image's regions or shorten the phrases.", path, number))
            break
    return _Dataset(list(names.values()), max_boxes, where)


def _check_caption(names: list[str], take: int, key: str, text_encoder_type: str, max_text_len: int,
                   what: str, path: Optional[str]) -> list[Finding]:
    counter = _counter(text_encoder_type)
    total = caption_tokens(sorted(counter.costs(names), reverse=True)[:take])
    if total <= max_text_len:
        return []
    make = _error if counter.exact else _warning
    return [make("caption_too_long", "model.max_text_len",
                 f"{what} takes {total} tokens{'' if counter.exact else ' (estimated)'} > max_text_len={max_text_len}; "
                 "names past the limit get empty positive maps and are never detected.",
                 f"shorten the category names, lower dataset.max_labels, or split the classes ({key}).", path)]


def preflight(spec: dict, action: str, inputs: dict, data_sources: Optional[dict] = None,
              parent_spec: Optional[dict] = None, stage: str = "submit") -> list[Finding]:
    """Every finding for `action` on the resolved `spec`.

    inputs / data_sources: the action's entries in skill_info (spec key -> InputInfo; spec key -> DataSource,
    whose `runtime: extracted_folder` keys may hold archives until the job unpacks them);
    parent_spec: the spec of the job whose model is used.
    """
    findings = _check_paths(spec, inputs, data_source_keys(data_sources or {}), stage)
    if any(f.severity == "error" for f in findings):
        return findings  # the data checks below would only repeat "file not found"
    model = spec.get("model") or {}
    max_text_len = int(model.get("max_text_len", POSITIVE_MAP_WIDTH))
    encoder = str(model.get("text_encoder_type", "bert-base-uncased"))
    findings += _check_text_len(spec, action, max_text_len, parent_spec)
    try:
        train = _train_sets(spec, findings, encoder, max_text_len, stage) if action == "train" else []
        evals = _eval_sets(spec, action, findings, stage)
    except _Unreadable as exc:
        return findings + [exc.finding]
    if train:
        names = sorted({n for d in train for n in d.names})
        if names:
            take = min(len(names), int((spec.get("dataset") or {}).get("max_labels", 50)))
            findings += _check_caption(names, take, "dataset.train_data_sources", encoder, max_text_len,
                                       f"a training caption of {take} category names", None)
        densest = max(train, key=lambda d: d.max_boxes)
        queries = int(model.get("num_queries", 900))
        if densest.max_boxes > queries:
            findings.append(_error("num_queries_too_small", "model.num_queries",
                                   f"the densest training image has {densest.max_boxes} boxes > num_queries="
                                   f"{queries}; the matcher cannot assign every box.",
                                   f"set model.num_queries >= {densest.max_boxes} (900 is the default).",
                                   *densest.max_boxes_where))
    for key, data in evals:
        findings += _check_caption(data.names, len(data.names), key, encoder, max_text_len,
                                   "the caption of all category names", data.max_boxes_where[0])
        findings += _check_num_select(model, key, data)
    return findings


def _check_text_len(spec: dict, action: str, max_text_len: int, parent_spec: Optional[dict]) -> list[Finding]:
    theirs = ((parent_spec or {}).get("model") or {}).get("max_text_len")
    if theirs is not None and int(theirs) != max_text_len:
        return [_error("max_text_len_mismatch", "model.max_text_len",
                       f"{max_text_len} differs from the parent checkpoint's {theirs}; logits and positive maps "
                       "have this width, so the weights do not fit.", f"set model.max_text_len={theirs}.")]
    given = [k for k in ("train.pretrained_model_path", f"{action}.checkpoint", "quantize.model_path")
             if get_path(spec, k, None)]
    if max_text_len != POSITIVE_MAP_WIDTH and given and parent_spec is None:
        return [_warning("max_text_len_not_256", "model.max_text_len",
                         f"{max_text_len} with a given model ({given[0]}); public checkpoints use "
                         f"{POSITIVE_MAP_WIDTH} and load only at that width.",
                         f"keep {POSITIVE_MAP_WIDTH} unless the checkpoint was trained with {max_text_len}.")]
    return []


def _check_num_select(model: dict, key: str, data: _Dataset) -> list[Finding]:
    select, queries = int(model.get("num_select", 300)), int(model.get("num_queries", 900))
    classes = max(len(data.names), 1)
    if select > queries * classes:
        return [_error("num_select_too_large", "model.num_select",
                       f"num_select={select} > num_queries x classes = {queries} x {classes}; top-k would fail.",
                       f"set model.num_select <= {queries * classes}.", data.max_boxes_where[0])]
    if data.max_boxes > select:
        return [_warning("num_select_too_small", "model.num_select",
                         f"the densest image in {key} has {data.max_boxes} boxes > num_select={select}; recall "
                         "on it is capped.", f"set model.num_select >= {data.max_boxes}.", *data.max_boxes_where)]
    return []


def _train_sets(spec: dict, findings: list[Finding], encoder: str, max_text_len: int, stage: str) -> list[_Dataset]:
    sets = []
    for i, source in enumerate((spec.get("dataset") or {}).get("train_data_sources") or []):
        key = f"dataset.train_data_sources[{i}]"
        json_file = source.get("json_file")
        if not json_file or (is_s3(json_file) and stage == "submit"):
            continue
        label_map = source.get("label_map")
        if label_map and is_s3(label_map):
            continue
        if str(json_file).endswith(".jsonl"):
            data = _odvg(Path(json_file), f"{key}.json_file", f"{key}.label_map", label_map, findings, encoder,
                         max_text_len)
        else:
            data = _coco(Path(json_file), f"{key}.json_file", findings, check_ids=False)
        if data is not None:
            sets.append(data)
    return sets


def _eval_sets(spec: dict, action: str, findings: list[Finding], stage: str) -> list[tuple[str, _Dataset]]:
    keys = {
        "train": ["val_data_sources"], "evaluate": ["test_data_sources"],
        "quantize": ["quant_calibration_data_sources", "val_data_sources"],
    }.get(action, [])
    sets = []
    for name in keys:
        json_file = ((spec.get("dataset") or {}).get(name) or {}).get("json_file")
        if not json_file or (is_s3(json_file) and stage == "submit") or not Path(json_file).is_file():
            continue
        key = f"dataset.{name}.json_file"
        data = _coco(Path(json_file), key, findings, check_ids=True)
        if data is not None:
            sets.append((key, data))
    return sets


def check(spec: dict, action: str, inputs: dict, data_sources: Optional[dict] = None,
          parent_spec: Optional[dict] = None, stage: str = "submit", warn=print) -> list[Finding]:
    """Run preflight; print warnings through `warn`, raise PreflightError when there is an error."""
    findings = preflight(spec, action, inputs, data_sources, parent_spec, stage)
    for finding in findings:
        if finding.severity == "warning":
            warn(str(finding))
    if any(f.severity == "error" for f in findings):
        raise PreflightError(findings)
    return findings
