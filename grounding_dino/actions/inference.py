"""The inference action: text-prompted detection on folders of images with a checkpoint (.pth), an .onnx model or a
TensorRT engine (inference.trt_engine, with the deploy backend).

Inputs: dataset.infer_data_sources.image_dir (one or several folders, searched recursively) and .captions (the
phrases; label i is captions[i]). Images keep their aspect ratio (shorter side dataset.augmentation.
test_random_resize) unless inference.input_width/input_height are set or the model has a fixed input (ONNX).
Phrase lists longer than max_text_len tokens run as several prompts (Predictor.detect).

Outputs in inference.results_dir, else <results_dir>/inference, for every image (also those without detections):
  images_annotated/<image>    boxes and "phrase score" tags drawn (a stable color per phrase, inference.color_map)
  labels/<image stem>.txt     KITTI-style lines, 16 fields: `phrase 0 0 0 x1 y1 x2 y2 0 0 0 0 0 0 0 score`;
                              KITTI fields are space-separated, so spaces inside a phrase become underscores
                              ("red car" -> red_car); results.json keeps the phrase as written
  results.json                COCO detections: image_id (position in the image list), file_name, category_id
                              (index in captions), category_name, bbox [x, y, w, h] pixels, score
Detections below inference.conf_threshold are dropped. With inference.is_internal the outputs keep each image's
path below its source folder, prefixed by the folder's name; otherwise file names must be unique.
With inference.num_gpus > 1 the images are split by whole batches across that many worker processes (one per GPU
under CUDA, sharing the cores on CPU; grounding_dino.actions.sharding); each writes its own images' files, and
results.json is written once, in image order.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from grounding_dino.actions import ActionRun
from grounding_dino.actions.evaluate import announce_precision
from grounding_dino.actions.sharding import check_processes, run_sharded, shard_loader
from grounding_dino.config import ExperimentConfig
from grounding_dino.data.captions import normalize_name
from grounding_dino.data.errors import DataError
from grounding_dino.data.images import read_image
from grounding_dino.data.loader import collate_fn
from grounding_dino.data.transforms import build_transforms
from grounding_dino.detector import SAVE_OPTIONS, Detector, Prediction, prepare
from grounding_dino.precision import resolve
from grounding_dino.predictor import Predictor, load_predictor, model_path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folders: Sequence[str], keep_structure: bool) -> List[Tuple[Path, Path]]:
    """(image path, output path relative to the output folders) for every image below `folders`, sorted."""
    if isinstance(folders, str):
        folders = [folders]
    if not folders:
        raise ValueError("dataset.infer_data_sources.image_dir is empty: give one or more image folders")
    found: List[Tuple[Path, Path]] = []
    for i, folder in enumerate(folders):
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"dataset.infer_data_sources.image_dir[{i}]: {folder} is not a folder (extract "
                             "archives first)")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"dataset.infer_data_sources.image_dir[{i}]: {folder} holds no image "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        found += [(p, Path(root.resolve().name) / p.relative_to(root) if keep_structure else Path(p.name))
                  for p in files]
    seen: Dict[Path, Path] = {}
    for path, out in found:
        key = out.with_suffix("")  # label files are named by stem, so a.jpg and a.png would collide too
        if key in seen:
            raise ValueError(f"{seen[key]} and {path} would both write outputs named {key}.*; set "
                             "inference.is_internal true to keep the folder structure, or rename one")
        seen[key] = path
    return found


class ImageList(Dataset):
    """Images → (normalised tensor, {index, orig_size}) prepared as Detector.predict prepares them."""

    def __init__(self, paths: Sequence[Path], transforms):
        self.paths = list(paths)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            image = read_image(path)
        except OSError as err:
            raise DataError(f"dataset.infer_data_sources.image_dir: cannot read image {path}: {err}. Fix: replace "
                            "or remove the file") from None
        tensor, orig_size = prepare(image, self.transforms)
        return tensor, {"index": index, "orig_size": orig_size}


def kitti_line(phrase: str, box: Sequence[float], score: float) -> str:
    """`phrase 0 0 0 x1 y1 x2 y2 0 0 0 0 0 0 0 score`, spaces in the phrase replaced by underscores."""
    x1, y1, x2, y2 = box
    name = "_".join(phrase.split())
    return f"{name} 0.00 0 0.00 {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} 0.00 0.00 0.00 0.00 0.00 0.00 0.00 {score:.4f}"


def infer_phrases(cfg: ExperimentConfig) -> List[str]:
    """dataset.infer_data_sources.captions, normalised; refused when empty or repeated."""
    captions = cfg.dataset.infer_data_sources.captions
    phrases = [normalize_name(c) for c in captions]
    if not phrases or not all(phrases):
        raise ValueError(f"dataset.infer_data_sources.captions must list one or more non-empty phrases, got "
                         f"{list(captions)!r}")
    if len(set(phrases)) != len(phrases):
        raise ValueError(f"dataset.infer_data_sources.captions repeats a phrase: {phrases}")
    return phrases


def infer_loader(cfg: ExperimentConfig,
                 size: Optional[Tuple[int, int]]) -> Tuple[List[Tuple[Path, Path]], DataLoader]:
    """The inference images ((source, output) paths) and their batches, resized to `size` (width, height) or, when
    None, by the augmentation's test resize (Detector.input_size)."""
    options = cfg.inference
    images = list_images(cfg.dataset.infer_data_sources.image_dir, options.is_internal)
    dataset = ImageList([path for path, _ in images], build_transforms(cfg.dataset.augmentation, False, size))
    loader = DataLoader(dataset, batch_size=options.batch_size if options.batch_size > 0 else cfg.dataset.batch_size,
                        num_workers=cfg.dataset.workers, collate_fn=functools.partial(collate_fn, pad_size=None))
    return images, loader


def infer(cfg: ExperimentConfig, predictor: Predictor, results_dir: Path) -> List[dict]:
    """Run inference as the spec says and write the outputs; returns the COCO detection records."""
    return write_results(results_dir, detect_and_draw(cfg, predictor, results_dir))


def detect_and_draw(cfg: ExperimentConfig, predictor: Predictor, results_dir: Path, rank: int = 0,
                    world: int = 1) -> List[dict]:
    """The images of shard `rank` of `world` (sharding.ShardBatches; all of them when world is 1): their annotated
    copies and label files written, their COCO detection records returned in image order."""
    detector = Detector(predictor, cfg, "inference")
    phrases = tuple(infer_phrases(cfg))
    chunks = detector.chunks(phrases)
    images, loader = infer_loader(cfg, detector.input_size)
    log.info("inference on %d images with %d phrases in %d prompt(s)", len(images), len(phrases), len(chunks))

    records: List[dict] = []
    batches = shard_loader(loader, rank, world)
    for batch, pixel_mask, targets in tqdm(batches, desc="inference", unit="batch", dynamic_ncols=True,
                                           disable=rank > 0):  # rank 0's bar is the progress of all of them
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        results = detector.predict_batch(batch, pixel_mask, orig_sizes, [phrases] * len(targets))
        for target, result in zip(targets, results):
            path, out = images[target["index"]]
            _write_image(detector, path, out, result, results_dir)
            records += [{"image_id": target["index"], "file_name": str(out), "category_id": label,
                         "category_name": phrase, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
                        for (x1, y1, x2, y2), label, phrase, score in zip(
                            result.boxes.tolist(), result.labels.tolist(), result.phrases, result.scores.tolist())]
    return records


def write_results(results_dir: Path, records: List[dict]) -> List[dict]:
    """results.json: the records, as they are."""
    (results_dir / "results.json").write_text(json.dumps(records, allow_nan=False) + "\n")
    return records


def infer_sharded(cfg: ExperimentConfig, processes: int, results_dir: Path) -> List[dict]:
    """`infer` with inference.checkpoint on `processes` worker processes (grounding_dino.actions.sharding). Each
    writes the per-image files of its own images (no two ranks share one); results.json is written here, in image
    order, as one process writes it."""
    parts = run_sharded(_infer_shard, cfg, "inference", processes, results_dir)
    # A stable sort by image keeps each image's records in the order its rank wrote them (best first).
    return write_results(results_dir, sorted((r for part in parts for r in part), key=lambda r: r["image_id"]))


def _infer_shard(cfg: ExperimentConfig, rank: int, world: int, results_dir: Path) -> List[dict]:
    """Runs in worker process `rank`: that shard's outputs written, its records returned."""
    predictor = load_predictor(model_path(cfg, "inference"), cfg, "inference")
    return detect_and_draw(cfg, predictor, results_dir, rank, world)


def _write_image(detector: Detector, path: Path, out: Path, result: Prediction, results_dir: Path) -> None:
    label_file = results_dir / "labels" / out.with_suffix(".txt")
    label_file.parent.mkdir(parents=True, exist_ok=True)
    label_file.write_text("".join(kitti_line(phrase, box, score) + "\n" for box, phrase, score in zip(
        result.boxes.tolist(), result.phrases, result.scores.tolist())))
    annotated = results_dir / "images_annotated" / out
    annotated.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(path) as stored:
        image_format = stored.format
    # the boxes are in the coordinates of the image the model saw: converted and EXIF-oriented
    drawn = detector.annotate(path, result)
    drawn.save(annotated, format=image_format, **SAVE_OPTIONS.get(image_format, {}))


def run_inference(cfg: ExperimentConfig, run: ActionRun) -> None:
    """The `inference` action: inference.checkpoint (or trt_engine) on dataset.infer_data_sources."""
    path = model_path(cfg, "inference")
    processes = check_processes(cfg, "inference", path)
    if processes > 1:
        records = infer_sharded(cfg, processes, run.results_dir)
        precision = resolve(cfg.inference.precision, "cuda" if torch.cuda.is_available() else "cpu")[0]
    else:
        predictor = load_predictor(path, cfg, "inference")
        precision = announce_precision(predictor, "inference")
        records = infer(cfg, predictor, run.results_dir)
    where = run.results_dir.resolve()
    # Said on stdout too: the outputs' place is otherwise only in the docs, and a job's folder is not the cwd.
    print(f"inference: {len(records)} detections written to {where}: images_annotated/, labels/, results.json")
    run.report.succeed(f"Inference finished: {len(records)} detections in {where}.", precision=precision)
