"""Drawing for the synthetic set: textured backgrounds and anti-aliased shape masks (numpy + Pillow, no torch)."""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 70, 215),
    "yellow": (235, 215, 40),
    "orange": (240, 135, 25),
    "purple": (125, 45, 175),
    "cyan": (40, 195, 215),
    "magenta": (215, 45, 195),
    "pink": (245, 155, 190),
    "brown": (125, 80, 35),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}

SUPERSAMPLE = 4


def _regular(n: int, start: float = -math.pi / 2) -> List[Tuple[float, float]]:
    return [(math.cos(start + 2 * math.pi * k / n), math.sin(start + 2 * math.pi * k / n)) for k in range(n)]


def _star(points: int = 5, inner: float = 0.45) -> List[Tuple[float, float]]:
    outer = _regular(2 * points)
    return [(x * (1 if k % 2 == 0 else inner), y * (1 if k % 2 == 0 else inner)) for k, (x, y) in enumerate(outer)]


def _cross(arm: float = 0.34) -> List[Tuple[float, float]]:
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


# Unit outlines (radius 1 around the origin); a shape's rotation is applied when it is drawn.
OUTLINES: Dict[str, List[Tuple[float, float]]] = {
    "square": _regular(4, start=math.pi / 4),
    "triangle": _regular(3),
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "star": _star(),
    "diamond": [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)],
    "cross": _cross(),
}


def _draw_polygon(outline: List[Tuple[float, float]]) -> Callable:
    def draw(canvas: ImageDraw.ImageDraw, center: float, radius: float, angle: float) -> None:
        c, s = math.cos(angle), math.sin(angle)
        canvas.polygon([(center + radius * (x * c - y * s), center + radius * (x * s + y * c)) for x, y in outline],
                       fill=255)
    return draw


def _draw_circle(canvas, center, radius, angle) -> None:
    canvas.ellipse([center - radius, center - radius, center + radius, center + radius], fill=255)


def _draw_ring(canvas, center, radius, angle) -> None:
    _draw_circle(canvas, center, radius, angle)
    hole = 0.55 * radius
    canvas.ellipse([center - hole, center - hole, center + hole, center + hole], fill=0)


SHAPES: Dict[str, Callable] = {"circle": _draw_circle, "ring": _draw_ring,
                               **{name: _draw_polygon(outline) for name, outline in OUTLINES.items()}}


def shape_mask(shape: str, side: int, angle: float) -> np.ndarray:
    """Coverage in 0..1 of `shape` inscribed in a side×side square, rotated by `angle` radians."""
    big = side * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    SHAPES[shape](ImageDraw.Draw(mask), big / 2, big / 2 - SUPERSAMPLE, angle)
    return np.asarray(mask.resize((side, side), Image.BOX), dtype=np.float32) / 255.0


def _two_colors(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=(2, 3)).astype(np.float32)


def _mix(weight: np.ndarray, colors: np.ndarray) -> np.ndarray:
    return colors[0] + weight[..., None] * (colors[1] - colors[0])


def _gradient(rng, yy, xx, size):
    angle = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / size
    return _mix((t - t.min()) / max(float(t.max() - t.min()), 1e-6), _two_colors(rng))


def _stripes(rng, yy, xx, size):
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(0.04, 0.2) * size
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
    return _mix((np.sin(2 * math.pi * phase) > 0).astype(np.float32), _two_colors(rng))


def _checker(rng, yy, xx, size):
    cell = rng.uniform(0.05, 0.2) * size
    return _mix(((yy // cell + xx // cell) % 2).astype(np.float32), _two_colors(rng))


def _blobs(rng, yy, xx, size):
    coarse = rng.uniform(0, 255, size=(6, 6, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)


BACKGROUNDS: Dict[str, Callable] = {"gradient": _gradient, "stripes": _stripes, "checker": _checker,
                                    "blobs": _blobs}


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> np.ndarray:
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    grid.setflags(write=False)
    return grid


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 [size,size,3] texture: gradient, stripes, checkerboard or colour blobs."""
    yy, xx = _grid(size)
    kind = sorted(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return np.ascontiguousarray(BACKGROUNDS[kind](rng, yy, xx, size), dtype=np.float32)


def add_noise(rng: np.random.Generator, canvas: np.ndarray, amplitude: int) -> np.ndarray:
    """Uniform pixel noise in [-amplitude, amplitude] over the whole image, then uint8 (integer draws are cheap)."""
    noise = rng.integers(-amplitude, amplitude + 1, size=canvas.shape, dtype=np.int16)
    return np.clip(canvas + noise, 0, 255).astype(np.uint8)
