"""Images as users have them: pixel formats, EXIF orientation, decompression bombs and truncated files, read by the
one reader of training, evaluation and inference (grounding_dino.data.images)."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from grounding_dino.config import load_experiment
from grounding_dino.data import DataError, DataWarning, build_dataset
from grounding_dino.data.images import APPLY, KEEP, NEITHER, ImageReadError, open_rgb, orientation_rule, read_image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def _saved(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


def _palette_with_transparency(path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)  # index 0 red, index 1 blue
    image.putpixel((3, 3), 1)
    return _saved(image, path, transparency=1)  # the blue corner is fully transparent


@pytest.mark.parametrize("mode, make, expect", [
    ("RGB", lambda p: _saved(Image.new("RGB", (4, 4), RED), p), {(0, 0): RED}),
    ("L", lambda p: _saved(Image.new("L", (4, 4), 77), p), {(0, 0): (77, 77, 77)}),
    ("1", lambda p: _saved(Image.new("1", (4, 4), 1), p), {(0, 0): WHITE}),
    ("P", _palette_with_transparency, {(0, 0): RED, (3, 3): WHITE}),
    ("LA", lambda p: _saved(Image.new("LA", (4, 4), (0, 0)), p), {(0, 0): WHITE}),
    ("RGBA", lambda p: _saved(Image.merge("RGBA", [*Image.new("RGB", (4, 4), BLUE).split(), Image.new("L", (4, 4),
                                                                                                   255)]), p),
     {(0, 0): BLUE}),
    ("CMYK", lambda p: _saved(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), p.with_suffix(".jpg"), quality=100),
     {(0, 0): RED}),
    ("I;16", lambda p: _saved(Image.fromarray(np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)), p),
     {(0, 0): (0,) * 3, (1, 0): (128,) * 3, (0, 1): (255,) * 3, (1, 1): (4,) * 3}),
    ("I", lambda p: _saved(Image.fromarray(np.array([[40000, 257]], dtype=np.int32), "I"), p.with_suffix(".tif")),
     {(0, 0): (156,) * 3, (1, 0): (1,) * 3}),
    ("F", lambda p: _saved(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F"),
                           p.with_suffix(".tif")),
     {(0, 0): (0,) * 3, (1, 0): (128,) * 3, (2, 0): WHITE}),
])
def test_every_pixel_format_becomes_sensible_rgb(tmp_path, mode, make, expect):
    path = make(tmp_path / "image.png")
    with Image.open(path) as stored:
        assert stored.mode == mode  # the file really is in the mode under test
    image = read_image(path)
    assert image.mode == "RGB"
    for xy, colour in expect.items():
        got = image.getpixel(xy)
        assert all(abs(a - b) <= 2 for a, b in zip(got, colour)), (xy, got, colour)


def test_sixteen_bit_png_is_scaled_by_its_bit_depth_not_its_maximum(tmp_path):
    # a dark 16-bit image (max 8000 of 65535) stays dark: scaling by its maximum would stretch it to white
    path = _saved(Image.fromarray(np.full((3, 3), 8000, dtype=np.uint16)), tmp_path / "dark.png")
    assert read_image(path).getpixel((1, 1)) == (31, 31, 31)


def _exif_jpeg(path, orientation=6, size=(40, 20)):
    """Left half red, right half blue, stored `size`, with EXIF orientation `orientation` (6: turn 90 degrees
    clockwise to view)."""
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)
    return path


def test_orientation_rule():
    assert orientation_rule(1, (40, 20), (99, 99)) == KEEP
    assert orientation_rule(6, (40, 20), None) == APPLY
    assert orientation_rule(6, (40, 20), (20, 40)) == APPLY
    assert orientation_rule(6, (40, 20), (40, 20)) == KEEP
    assert orientation_rule(6, (40, 20), (30, 30)) == NEITHER
    assert orientation_rule(3, (40, 20), (40, 20)) == APPLY  # a half turn matches both: applied, as in inference


def test_exif_orientation_for_inference_and_by_the_annotation(tmp_path):
    path = _exif_jpeg(tmp_path / "turned.jpg")
    viewed = read_image(path)  # inference: the tag applied
    assert viewed.size == (20, 40)
    assert viewed.getpixel((10, 2))[0] > 200 and viewed.getpixel((10, 37))[2] > 200  # red on top, blue below
    image, rule = open_rgb(path, (20, 40))
    assert (rule, image.size) == (APPLY, (20, 40))
    image, rule = open_rgb(path, (40, 20))
    assert (rule, image.size) == (KEEP, (40, 20)) and image.getpixel((2, 10))[0] > 200


def _odvg_config(tmp_path, width, height):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    _exif_jpeg(images / "turned.jpg")
    line = {"file_name": "turned.jpg", "width": width, "height": height,
            "detection": {"instances": [{"bbox": [1, 1, 15, 15], "label": 0}]}}
    (tmp_path / "ann.jsonl").write_text(json.dumps(line) + "\n")
    (tmp_path / "labels.json").write_text(json.dumps({"0": "cat"}))
    return load_experiment({"dataset": {
        "workers": 0, "batch_size": 1,
        "augmentation": {"scales": [40], "train_random_resize": [40], "train_random_crop_min": 16,
                         "train_random_crop_max": 20, "random_resize_max_size": 80, "test_random_resize": 40},
        "train_data_sources": [{"image_dir": str(images), "json_file": str(tmp_path / "ann.jsonl"),
                                "label_map": str(tmp_path / "labels.json")}]}})


@pytest.mark.parametrize("annotated, shape", [((20, 40), (80, 40)), ((40, 20), (40, 80))])
def test_training_orients_by_the_annotation_without_warning(tmp_path, annotated, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        dataset = build_dataset(_odvg_config(tmp_path, *annotated), "train", train=False)
    image, target = dataset[0]
    assert tuple(image.shape[1:]) == shape  # shorter side 40, the annotation's aspect
    assert target["orig_size"].tolist() == [annotated[1], annotated[0]]


def test_annotation_matching_neither_orientation_warns_once_counted_and_resizes(tmp_path):
    with pytest.warns(DataWarning, match=r"dataset\.train_data_sources: 1 of 1 images carry an EXIF orientation but "
                                         r"match their annotation's width x height neither .*stored 40x20 with "
                                         r"orientation 6, annotated 30x30"):
        dataset = build_dataset(_odvg_config(tmp_path, 30, 30), "train", train=False)
    image, _ = dataset[0]
    assert tuple(image.shape[1:]) == (40, 40)


def test_inference_reads_through_the_same_reader(tmp_path):
    from grounding_dino.actions.inference import ImageList
    from grounding_dino.data.transforms import build_transforms

    path = _exif_jpeg(tmp_path / "turned.jpg")
    cfg = _odvg_config(tmp_path, 20, 40)
    items = ImageList([path], build_transforms(cfg.dataset.augmentation, False, None))
    _, meta = items[0]
    assert meta["orig_size"].tolist() == [40, 20]


def test_decompression_bomb_names_the_file_and_key_or_is_skipped(tmp_path, monkeypatch):
    cfg = _odvg_config(tmp_path, 20, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 800 pixels: over 2x the limit, Pillow's error
    with pytest.raises(ImageReadError, match="too many pixels to decode safely"):
        read_image(tmp_path / "images" / "turned.jpg")
    dataset = build_dataset(cfg, "train", train=False)
    with pytest.raises(DataError, match=r"^dataset\.train_data_sources\[0\]\.image_dir: cannot read image "
                                        r".*turned\.jpg .*too many pixels to decode safely"):
        dataset[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # between the limit and twice it: Pillow's warning
    with pytest.raises(ImageReadError, match="too many pixels"):
        read_image(tmp_path / "images" / "turned.jpg")
    skipping = load_experiment({**_plain(cfg), "dataset": {**_plain(cfg)["dataset"], "skip_bad_images": True}})
    with pytest.raises(DataError, match=r"none of the 1 images can be read .*too many pixels"):
        build_dataset(skipping, "train", train=False)


def _plain(cfg):
    import dataclasses

    return dataclasses.asdict(cfg)


def test_truncated_image_names_the_file_and_key(tmp_path):
    cfg = _odvg_config(tmp_path, 20, 40)
    path = tmp_path / "images" / "turned.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"^dataset\.train_data_sources\[0\]\.image_dir: cannot read image "
                                        r".*turned\.jpg .*truncated.*dataset\.skip_bad_images=true"):
        build_dataset(cfg, "train", train=False)[0]
