"""build_dataset: spec → sources read and checked → GroundingDataset. Every structural error surfaces here."""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

from ..config import ExperimentConfig
from .coco import coco_records
from .dataset import EpochDraws, GroundingDataset, TrainCaptions, unreadable_reason
from .errors import BoxAudit, DataError, DataWarning
from .images import NEITHER, header, orientation_rule
from .odvg import label_names, odvg_records
from .records import Record, store_records
from .tokens import TokenBudget
from .transforms import build_transforms

SPLITS = {
    "train": "train_data_sources",
    "val": "val_data_sources",
    "test": "test_data_sources",
    "calibration": "quant_calibration_data_sources",
}
ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")


def build_dataset(
    cfg: ExperimentConfig,
    split: str,
    *,
    tokenizer=None,
    train: Optional[bool] = None,
    input_size: Optional[Tuple[int, int]] = None,
) -> GroundingDataset:
    """The dataset of `split` ("train", "val", "test" or "calibration").

    train: training transforms and sampled captions; defaults to split == "train".
    tokenizer: a CaptionTokenizer; when given, captions are checked against its max_text_len.
    input_size: (width, height) for a fixed evaluation input (e.g. an exported model's); default keeps the aspect
        ratio with the shorter side at dataset.augmentation.test_random_resize.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    train = split == "train" if train is None else train
    data = cfg.dataset
    key = f"dataset.{SPLITS[split]}"
    audit = BoxAudit()
    if split == "train":
        records, vocabularies = _read_train_sources(data.train_data_sources, audit, key)
        image_dir_keys = [f"{key}[{i}].image_dir" for i in range(len(vocabularies))]
    else:
        source = getattr(data, SPLITS[split])
        _check_paths(key, source.json_file, source.image_dir)
        if not source.json_file.endswith(".json"):
            raise DataError(f"{key}.json_file: {source.json_file} must be a COCO .json file")
        records, names = coco_records(source.json_file, source.image_dir, audit, source=0, contiguous_ids=True)
        vocabularies = [tuple(names)]
        image_dir_keys = [f"{key}.image_dir"]
    if not records:
        raise DataError(f"{key}: the annotations list no images")
    audit.warn()
    if data.skip_bad_images:
        records = _readable(records, image_dir_keys)
    _warn_orientation_mismatches(records, key)

    transforms = build_transforms(data.augmentation, train, input_size)
    pad_size = _pad_size(transforms, records) if data.augmentation.fixed_padding else None
    common = dict(image_dir_keys=image_dir_keys, transforms=transforms, seed=cfg.train.seed, pad_size=pad_size)
    if split == "train":
        budget = _train_budget(tokenizer, records, vocabularies, data.max_labels) if tokenizer else None
        return GroundingDataset(store_records(records, data.dataset_type), vocabularies,
                                captions=TrainCaptions(data.max_labels, budget, data.hard_negatives),
                                draws=_draws(data.train_data_sources, records, key, cfg.train.seed), **common)
    if tokenizer is not None:
        _warn_long_eval_caption(tokenizer, list(vocabularies[0]), key)
    return GroundingDataset(store_records(records, data.dataset_type), vocabularies, phrases=list(vocabularies[0]),
                            coco_file=getattr(data, SPLITS[split]).json_file, **common)


def _read_train_sources(sources, audit: BoxAudit, key: str):
    if not sources:
        raise DataError(f"{key} is empty; add at least one {{image_dir, json_file, label_map}}")
    records: List[Record] = []
    vocabularies: List[Optional[Tuple[str, ...]]] = []
    for i, source in enumerate(sources):
        skey = f"{key}[{i}]"
        _check_paths(skey, source.json_file, source.image_dir)
        if source.json_file.endswith(".jsonl"):
            label_map = label_names(source.label_map, skey) if source.label_map else None
            part, vocabulary = odvg_records(source.json_file, source.image_dir, label_map, audit, skey, source=i)
        elif source.json_file.endswith(".json"):
            if source.label_map:
                raise DataError(f"{skey}.label_map: a COCO json_file names its own categories; remove label_map")
            part, vocabulary = coco_records(source.json_file, source.image_dir, audit, source=i, contiguous_ids=False)
        else:
            raise DataError(f"{skey}.json_file: {source.json_file} must be ODVG (.jsonl) or COCO (.json)")
        records += part
        vocabularies.append(tuple(vocabulary) if vocabulary is not None else None)
    return records, vocabularies


def _draws(sources, records: Sequence[Record], key: str, seed: int) -> Optional[EpochDraws]:
    """Per-epoch draws when a source's sampling_weight is not 1; None keeps one pass over every record."""
    weights = [source.sampling_weight for source in sources]
    if all(w == 1 for w in weights):
        return None
    draws = EpochDraws([r["source"] for r in records], weights, seed)
    if not len(draws):
        raise DataError(f"{key}: every source's sampling_weight is 0 (or its images were skipped), so an epoch "
                        "draws no image; give at least one source a weight above 0")
    return draws


def _check_paths(key: str, json_file: Optional[str], image_dir: Optional[str]) -> None:
    if not json_file:
        raise DataError(f"{key}.json_file is not set")
    if not image_dir:
        raise DataError(f"{key}.image_dir is not set")
    if not os.path.isfile(json_file):
        raise DataError(f"{key}.json_file: {json_file} does not exist")
    if os.path.isfile(image_dir) and image_dir.endswith(ARCHIVES):
        raise DataError(f"{key}.image_dir: {image_dir} is an archive; extract it and set image_dir to the folder")
    if not os.path.isdir(image_dir):
        raise DataError(f"{key}.image_dir: {image_dir} is not a folder")


def _readable(records: List[Record], image_dir_keys: Sequence[str]) -> List[Record]:
    """The records whose image decodes; the others are dropped with one warning that counts them. Every image is
    decoded once here (in threads: PIL releases the GIL) so a bad one is never met mid-epoch, where skipping it
    would change batch sizes and, in evaluation, score an image that was never looked at."""
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(unreadable_reason, [r["file"] for r in records]))
    bad = [(r, why) for r, why in zip(records, reasons) if why is not None]
    if not bad:
        return records
    record, why = bad[0]
    first = f"{record['file']}: {why}"
    if len(bad) == len(records):
        raise DataError(f"{image_dir_keys[record['source']]}: none of the {len(records)} images can be read "
                        f"(first: {first}); point the key at the folder that holds the images")
    warnings.warn(f"dataset.skip_bad_images: skipped {len(bad)} unreadable image{'s' if len(bad) != 1 else ''} "
                  f"of {len(records)} (first: {first})", DataWarning, stacklevel=3)
    return [r for r, why in zip(records, reasons) if why is None]


def _orientation(record: Record) -> Optional[Tuple[int, Tuple[int, int]]]:
    try:
        return header(record["file"])
    except Exception:  # unreadable: the loader or dataset.skip_bad_images names it
        return None


def _warn_orientation_mismatches(records: Sequence[Record], key: str) -> None:
    """One warning counting the images whose EXIF orientation leaves them matching their annotation's width and
    height neither as stored nor rotated (the loader rotates and resizes those). Reads headers only."""
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        found = list(pool.map(_orientation, records))
    odd = [(r, h) for r, h in zip(records, found)
           if h is not None and orientation_rule(h[0], h[1], (r["width"], r["height"])) == NEITHER]
    if not odd:
        return
    record, (orientation, (width, height)) = odd[0]
    warnings.warn(
        f"{key}: {len(odd)} of {len(records)} images carry an EXIF orientation but match their annotation's "
        f"width x height neither as stored nor rotated (first: {record['file']} ({record['where']}) is stored "
        f"{width}x{height} with orientation {orientation}, annotated {record['width']}x{record['height']}); they are "
        "rotated by the tag and resized to the annotated size. Fix: correct the annotations' width/height",
        DataWarning, stacklevel=3,
    )


def _pad_size(transforms, records: Sequence[Record]) -> Tuple[int, int]:
    """The largest (h, w) the transforms can produce from the dataset's image sizes."""
    shapes = set().union(*(transforms.reachable(h, w) for h, w in {(r["height"], r["width"]) for r in records}))
    return max(h for h, _ in shapes), max(w for _, w in shapes)


def _box_names(record: Record, vocabularies) -> List[str]:
    table = record["phrases"] if record["phrases"] is not None else vocabularies[record["source"]]
    return sorted({table[label] for label in record["labels"]})


def _train_budget(tokenizer, records: Sequence[Record], vocabularies, max_labels: int) -> TokenBudget:
    """Raise when one image's own names cannot fit max_text_len; warn when sampled negatives will be trimmed."""
    names = {n for v in vocabularies if v for n in v} | {p for r in records if r["phrases"] for p in r["phrases"]}
    budget = TokenBudget.from_tokenizer(tokenizer, names)
    longest = [sorted((budget.costs[n] for n in set(v)), reverse=True) if v else [] for v in vocabularies]
    may_trim = 0
    for record in records:
        positives = _box_names(record, vocabularies)
        need = budget.count(positives)
        if need > budget.limit:
            raise DataError(
                f"{record['where']}: the {len(positives)} names of this image's boxes need {need} tokens, more than "
                f"model.max_text_len {budget.limit}; shorten the names or split the image's annotations"
            )
        worst = longest[record["source"]] if record["phrases"] is None else []
        if need + sum(worst[:max(max_labels - len(positives), 0)]) > budget.limit:
            may_trim += 1
    if may_trim:
        warnings.warn(
            f"{may_trim} of {len(records)} training images may get captions longer than max_text_len "
            f"{budget.limit} tokens with dataset.max_labels {max_labels}; their sampled negative names are trimmed "
            "to fit", DataWarning, stacklevel=3,
        )
    return budget


def _warn_long_eval_caption(tokenizer, names: List[str], key: str) -> None:
    budget = TokenBudget.from_tokenizer(tokenizer, names)
    need = budget.count(names)
    if need > budget.limit:
        warnings.warn(
            f"{key}: the caption of all {len(names)} category names needs {need} tokens, more than max_text_len "
            f"{budget.limit}; categories past the limit cannot be detected", DataWarning, stacklevel=3,
        )
