"""A deterministic synthetic detection set: coloured shapes ("red circle", "blue triangle") on textured ground.

Written in the TAO data-source layout:
    OUT/train_datasets/images/train_000000.jpg, annotations_odvg.jsonl, annotations_odvg_labelmap.json
    OUT/eval_dataset/images/val_000000.jpg, annotations.json   (COCO, category ids 0..N-1)
The vocabulary is colours × shapes minus held-out names. The val set may use extra colours and shapes and the
held-out names (never seen in training), to test open-vocabulary transfer; its categories list the training
names first, in label-map order, then the new ones. The same arguments always give the same bytes.

    python -m grounding_dino.data.synthetic --out DIR --num-train 600 --num-val 100 --size 256 --seed 0
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .shapes import COLORS, SHAPES, add_noise, background, shape_mask

DEFAULT_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
DEFAULT_SHAPES = ("circle", "square", "triangle", "star", "hexagon")
SPLIT_CODE = {"train": 0, "val": 1}
JPEG_QUALITY = 92
MIN_SIZE, MAX_SIZE = 0.12, 0.34  # shape side as a fraction of the image side
MAX_OVERLAP = 0.3  # largest share of an earlier shape's box a later shape may cover
PLACEMENT_TRIES = 25
NOISE_AMPLITUDE = 16


def vocabulary(colors: Sequence[str], shapes: Sequence[str], exclude: Sequence[str] = ()) -> List[str]:
    """Names "color shape", colour-major, without `exclude`."""
    for color in colors:
        if color not in COLORS:
            raise ValueError(f"unknown colour {color!r}; choose from {', '.join(COLORS)}")
    for shape in shapes:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(sorted(SHAPES))}")
    skip = set(exclude)
    return [f"{c} {s}" for c in colors for s in shapes if f"{c} {s}" not in skip]


def render(rng: np.random.Generator, names: Sequence[str], size: int, max_objects: int):
    """One image: (PIL RGB image, [(name, [x1, y1, x2, y2]) ...]) with integer pixel boxes."""
    canvas = background(rng, size)
    objects: List[Tuple[str, List[int]]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        name = names[rng.integers(len(names))]
        color, shape = name.split(" ", 1)
        side = max(8, int(rng.uniform(MIN_SIZE, MAX_SIZE) * size))
        alpha = shape_mask(shape, side, rng.uniform(0, 2 * np.pi))
        rows, cols = np.nonzero(alpha >= 0.5)
        extent = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
        for _ in range(PLACEMENT_TRIES):
            x, y = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
            box = [x + extent[0], y + extent[1], x + extent[2], y + extent[3]]
            if all(_covered(earlier, box) <= MAX_OVERLAP for _, earlier in objects):
                break
        else:
            continue
        _paint(rng, canvas, alpha, x, y, np.array(COLORS[color], dtype=np.float32))
        objects.append((name, box))
    return Image.fromarray(add_noise(rng, canvas, NOISE_AMPLITUDE), "RGB"), objects


def _covered(earlier: List[int], box: List[int]) -> float:
    """Share of `earlier`'s area that `box` overlaps."""
    w = min(earlier[2], box[2]) - max(earlier[0], box[0])
    h = min(earlier[3], box[3]) - max(earlier[1], box[1])
    return max(w, 0) * max(h, 0) / ((earlier[2] - earlier[0]) * (earlier[3] - earlier[1]))


def _paint(rng, canvas: np.ndarray, alpha: np.ndarray, x: int, y: int, color: np.ndarray) -> None:
    """Blend a colour with a little jitter and a shading ramp, so no two instances are the same flat colour."""
    side = alpha.shape[0]
    ramp = np.linspace(-1, 1, side, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    shade = (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])[..., None] * rng.uniform(0, 25)
    fill = np.clip(color + rng.uniform(-18, 18, size=3).astype(np.float32) + shade, 0, 255)
    region = canvas[y:y + side, x:x + side]
    region += alpha[..., None] * (fill - region)


def write_split(
    folder: Path, split: str, count: int, names: Sequence[str], size: int, max_objects: int, seed: int
) -> List[dict]:
    """Render `count` images into folder/images and return their records (file_name, size, objects)."""
    return write_images(folder, split, count, names, size, max_objects, (seed, SPLIT_CODE[split]))


def write_images(folder: Path, prefix: str, count: int, names: Sequence[str], size: int, max_objects: int,
                 seed_key: Sequence[int]) -> List[dict]:
    """Render `count` images (<prefix>_<i>.jpg, image i drawn from the generator seeded [*seed_key, i]) into
    folder/images and return their records; a name repeated in `names` is drawn that much more often."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        image, objects = render(np.random.default_rng([*seed_key, i]), names, size, max_objects)
        file_name = f"{prefix}_{i:06d}.jpg"
        image.save(folder / "images" / file_name, format="JPEG", quality=JPEG_QUALITY)
        records.append({"file_name": file_name, "image_id": i, "height": size, "width": size, "objects": objects})
    return records


def write_odvg(folder: Path, records: List[dict], names: Sequence[str]) -> Tuple[Path, Path]:
    label = {name: i for i, name in enumerate(names)}
    jsonl, label_map = folder / "annotations_odvg.jsonl", folder / "annotations_odvg_labelmap.json"
    with open(jsonl, "w", encoding="utf-8") as f:
        for r in records:
            instances = [{"bbox": box, "label": label[name], "category": name} for name, box in r["objects"]]
            f.write(json.dumps({"file_name": r["file_name"], "height": r["height"], "width": r["width"],
                                "image_id": r["image_id"], "detection": {"instances": instances}},
                               allow_nan=False) + "\n")
    names_json = json.dumps({str(i): name for i, name in enumerate(names)}, indent=1, allow_nan=False)
    label_map.write_text(names_json + "\n", encoding="utf-8")
    return jsonl, label_map


def write_coco(folder: Path, records: List[dict], names: Sequence[str]) -> Path:
    category = {name: i for i, name in enumerate(names)}
    annotations = []
    for r in records:
        for name, (x1, y1, x2, y2) in r["objects"]:
            annotations.append({"id": len(annotations) + 1, "image_id": r["image_id"], "category_id": category[name],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    coco = {
        "images": [{"id": r["image_id"], "file_name": r["file_name"], "height": r["height"], "width": r["width"]}
                   for r in records],
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(names)],
    }
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco, allow_nan=False) + "\n", encoding="utf-8")
    return path


def generate(
    out: str,
    num_train: int = 600,
    num_val: int = 100,
    image_size: int = 256,
    max_objects: int = 6,
    seed: int = 0,
    colors: Sequence[str] = DEFAULT_COLORS,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    holdout: Sequence[str] = (),
    val_colors: Optional[Sequence[str]] = None,
    val_shapes: Optional[Sequence[str]] = None,
) -> Dict[str, str]:
    """Write the train (ODVG) and val (COCO) splits under `out`; return the spec paths of both.

    holdout: names ("red circle") left out of training, images and label map alike.
    val_colors/val_shapes: the val vocabulary (default: the training colours and shapes, holdout included).
    """
    if image_size < 32 or max_objects < 1 or num_train < 0 or num_val < 0:
        raise ValueError("need image_size >= 32, max_objects >= 1 and non-negative image counts")
    train_names = vocabulary(colors, shapes, exclude=holdout)
    unknown = set(holdout) - set(vocabulary(colors, shapes)) - set(vocabulary(val_colors or (), val_shapes or ()))
    if unknown:
        raise ValueError(f"held-out names {sorted(unknown)} are not colour × shape names of the vocabulary")
    if not train_names:
        raise ValueError("the training vocabulary is empty")
    val_vocab = vocabulary(val_colors or colors, val_shapes or shapes)
    val_names = [n for n in train_names if n in val_vocab] + [n for n in val_vocab if n not in train_names]

    root = Path(out)
    train_dir, val_dir = root / "train_datasets", root / "eval_dataset"
    jsonl, label_map = write_odvg(train_dir, write_split(train_dir, "train", num_train, train_names, image_size,
                                                         max_objects, seed), train_names)
    coco = write_coco(val_dir, write_split(val_dir, "val", num_val, val_names, image_size, max_objects, seed),
                      val_names)
    return {
        "train_image_dir": str(train_dir / "images"), "train_json_file": str(jsonl), "label_map": str(label_map),
        "val_image_dir": str(val_dir / "images"), "val_json_file": str(coco),
    }


def pack_images(folder: str) -> str:
    """Pack an image folder into a sibling `<folder>.tar.gz` and return its path.

    Members are the folder's files by their paths relative to it (no leading folder), so extracting the archive
    into an empty folder recreates image_dir. Sorted names, zero times and owners make the bytes reproducible.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{folder} is not a folder")
    archive = root.with_name(root.name + ".tar.gz")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    with open(archive, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return str(archive)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m grounding_dino.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--max-objects", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--colors", nargs="+", default=list(DEFAULT_COLORS), help=f"from: {' '.join(COLORS)}")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help=f"from: {' '.join(sorted(SHAPES))}")
    parser.add_argument("--holdout", nargs="*", default=[], help='names left out of training, e.g. "red circle"')
    parser.add_argument("--val-colors", nargs="+", help="val colours (default: --colors)")
    parser.add_argument("--val-shapes", nargs="+", help="val shapes (default: --shapes)")
    parser.add_argument("--pack", action="store_true", help="also write images.tar.gz next to each images folder")
    args = parser.parse_args(argv)
    try:
        paths = generate(args.out, args.num_train, args.num_val, args.size, args.max_objects, args.seed,
                         args.colors, args.shapes, args.holdout, args.val_colors, args.val_shapes)
    except ValueError as e:
        parser.error(str(e))
    if args.pack:
        paths["train_archive"] = pack_images(paths["train_image_dir"])
        paths["val_archive"] = pack_images(paths["val_image_dir"])
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()
