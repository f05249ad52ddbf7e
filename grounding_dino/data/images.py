"""Reading an image file as users have it: the one reader of training, evaluation and inference.

Every pixel format Pillow opens becomes 8-bit RGB by what its values mean, not by Pillow's bare `convert("RGB")`,
which clips 16-bit values to white:
  I;16 / I;16B / I;16L   16-bit grayscale, scaled by the bit depth (value / 257, so 65535 -> 255)
  I                      32-bit integers, read as 16-bit values (how Pillow opens some 16-bit PNG and TIFF files)
  F                      floats: [0, 1] scaled to [0, 255] when every value lies in it, else clipped to [0, 255]
  P with transparency, PA, LA, RGBA
                         composited over white, so transparent pixels do not take whatever colour hides under them
  1, L, CMYK, YCbCr, LAB, HSV, P
                         Pillow's conversion

EXIF orientation (the rule, also in skills/grounding-dino/SKILL.md): with an annotation, the tag is applied when
the annotation's width x height matches the rotated image (also when it matches both, as for a 180-degree turn or a
square image), the stored orientation is kept when the annotation matches only the stored one, and when it matches
neither the tag is applied and the image resized to the annotation's size (build_dataset warns once, counted).
Without an annotation (inference) the tag is applied.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
# Orientations 5-8 turn the image by 90 degrees, so width and height swap.
SWAPPING = {5, 6, 7, 8}
APPLY, KEEP, NEITHER = "apply", "keep", "neither"
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
WITH_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
BACKGROUND = (255, 255, 255)


class ImageReadError(OSError):
    """An image Pillow refuses to decode safely (a decompression bomb); an OSError like every unreadable file."""


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1-8) of an opened image; 1 when it has none or its EXIF cannot be parsed."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block must not make the pixels unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented_size(orientation: int, size: Tuple[int, int]) -> Tuple[int, int]:
    """(width, height) of a stored `size` once `orientation` is applied."""
    return (size[1], size[0]) if orientation in SWAPPING else tuple(size)


def orientation_rule(orientation: int, stored: Tuple[int, int], annotated: Optional[Tuple[int, int]]) -> str:
    """APPLY, KEEP or NEITHER (see the module docstring) for an image stored at `stored` (width, height) whose
    annotation says `annotated` (None: no annotation)."""
    if orientation == 1:
        return KEEP
    if annotated is None or tuple(annotated) == oriented_size(orientation, stored):
        return APPLY
    if tuple(annotated) == tuple(stored):
        return KEEP
    return NEITHER


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, by the meaning of its pixel values (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT or mode == "I":
        values = np.asarray(image).astype(np.float64)
        return _gray(np.clip(values, 0, 65535) / 257.0)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return _gray(np.clip(values, 0, 255))
    if mode in WITH_ALPHA or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return image.convert("RGB")


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(values).astype(np.uint8), "L").convert("RGB")


def open_rgb(path, annotated: Optional[Tuple[int, int]] = None) -> Tuple[Image.Image, str]:
    """(the image at `path` fully decoded to RGB and oriented by the EXIF rule, the rule applied).

    `annotated` is the annotation's (width, height), None for inference. Raises OSError when the file cannot be
    decoded (missing, truncated, not an image, or over Pillow's decompression-bomb limit).
    """
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; such a file is refused as well
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as opened:
                rule = orientation_rule(exif_orientation(opened), opened.size, annotated)
                image = ImageOps.exif_transpose(opened) if rule != KEEP else opened
                image.load()
                return to_rgb(image), rule
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageReadError(
                f"too many pixels to decode safely ({err}); if the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS "
                "or downscale it"
            ) from None


def read_image(path) -> Image.Image:
    """The image at `path` as inference sees it: RGB, EXIF orientation applied."""
    return open_rgb(path)[0]


def header(path) -> Tuple[int, Tuple[int, int]]:
    """(EXIF orientation, stored (width, height)) from the file's header, without decoding the pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            return exif_orientation(opened), opened.size
