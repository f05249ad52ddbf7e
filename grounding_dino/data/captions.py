"""Captions: names joined as "a . b . c ." with each name's character span, and per-image name sampling."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

SEPARATOR = " . "
TERMINATOR = " ."


def normalize_name(name: str) -> str:
    return name.strip().lower()


def build_caption(names: Sequence[str]) -> Tuple[str, List[Tuple[int, int]]]:
    """Join names (lower-cased, stripped) into a caption and return each name's (start, end) character span.

    Spans are recorded while joining, so a name that also occurs inside an earlier name ("car" after "race car")
    still points at its own position rather than at the first substring match.
    """
    parts: List[str] = []
    spans: List[Tuple[int, int]] = []
    start = 0
    for name in names:
        part = normalize_name(name)
        if not part:
            raise ValueError(f"empty name in caption names {list(names)!r}")
        parts.append(part)
        spans.append((start, start + len(part)))
        start += len(part) + len(SEPARATOR)
    return SEPARATOR.join(parts) + TERMINATOR, spans


def sample_names(
    positives: Sequence[str],
    negatives: Sequence[str],
    max_labels: int,
    rng: np.random.Generator,
    fits: Optional[Callable[[List[str]], bool]] = None,
) -> List[str]:
    """The names of one training caption: every positive, then sampled negatives, in a shuffled order.

    Positives are never dropped; negatives (those not among the positives) fill up to `max_labels`. `fits`, when
    given, says whether a list of names fits the text encoder; negatives are trimmed until it does. Inputs are
    sorted first so the result depends only on the rng, never on set order (PYTHONHASHSEED).
    """
    names = sorted(set(positives))
    chosen = set(names)
    pool = sorted(set(negatives) - chosen)
    k = min(len(pool), max(max_labels - len(names), 0))
    sampled = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)] if k else []
    if fits is not None:
        while sampled and not fits(names + sampled):
            sampled.pop()
    names += sampled
    return [names[i] for i in rng.permutation(len(names))]
