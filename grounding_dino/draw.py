"""Drawing detections with Pillow: a box outline and a "phrase score" tag per detection, one color per phrase.

A phrase's color is inference.color_map[phrase] when given (a color name or #rrggbb), else a hue derived from a hash
of the phrase, so the same phrase has the same color in every image, run and process.
"""
from __future__ import annotations

import colorsys
import hashlib
from typing import Dict, Mapping, Sequence, Tuple

from PIL import Image, ImageColor, ImageDraw, ImageFont

RGB = Tuple[int, int, int]


def stable_color(phrase: str) -> RGB:
    """A saturated color chosen by a hash of the phrase (Python's hash() changes between processes)."""
    digest = hashlib.sha256(phrase.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536
    value = 0.75 + 0.25 * digest[2] / 255
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.9, value))


def phrase_colors(phrases: Sequence[str], color_map: Mapping[str, str]) -> Dict[str, RGB]:
    """The color of every phrase; color_map keys are matched case-insensitively."""
    given = {}
    for key, value in color_map.items():
        try:
            given[key.strip().lower()] = ImageColor.getrgb(value)[:3]
        except (ValueError, AttributeError):
            raise ValueError(f"inference.color_map[{key!r}]: {value!r} is not a color name or #rrggbb") from None
    return {phrase: given.get(phrase, stable_color(phrase)) for phrase in phrases}


def _text_color(background: RGB) -> RGB:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def draw_detections(image: Image.Image, detections: Sequence[Tuple[Sequence[float], str, float]],
                    colors: Mapping[str, RGB], outline_width: int) -> Image.Image:
    """A copy of `image` with each (xyxy box in pixels, phrase, score) drawn; the best detection ends on top.

    The outline is drawn inside the box (Pillow's rectangle grows inwards). The tag sits above the box, else below
    it, else inside its top edge (a box of the image's full height), moved left when it would leave the image.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(10, round(min(out.size) / 40)))  # readable on large images too
    for box, phrase, score in sorted(detections, key=lambda d: d[2]):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        color = colors[phrase]
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=color, width=outline_width)
        tag = f"{phrase} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        width, height = right - left + 4, bottom - top + 2
        x = max(0, min(x1, out.width - width))  # keep the tag inside the image
        if y1 >= height:
            y = y1 - height
        elif y2 + height <= out.height:
            y = y2
        else:
            y = y1 + outline_width
        draw.rectangle((x, y, x + width - 1, y + height - 1), fill=color)
        draw.text((x + 2 - left, y + 1 - top), tag, fill=_text_color(color), font=font)
    return out
